"""The convert CLI: open_clip <-> safetensors round trips that open_clip itself reads, and clear errors."""

import json
import pathlib
import subprocess
import sys

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from echoclip_jax import convert
from echoclip_jax.config import files
from echoclip_jax.config.model import architecture
from echoclip_jax.runtime import storage
from echoclip_jax.training import checkpoint
from echoclip_jax.weights import conversion
from echoclip_jax.weights import loader as weights
from echoclip_jax.weights import open_clip as ocw

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "echoclip_jax.convert", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.interop
@pytest.mark.slow  # two CLI runs with JAX start-up and verification: ~60-100 s on the 2-core box
def test_cli_round_trip_open_clip_file_to_safetensors_to_open_clip_dir(tmp_path):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    src = open_clip.CLIP(**ocw.open_clip_model_cfg(files.load(CONFIGS / "tiny.py").model)).eval()
    torch.save(src.state_dict(), tmp_path / "laion.bin")

    r = run(
        "--src",
        f"open_clip:{tmp_path / 'laion.bin'}",
        "--dst",
        f"safetensors:{tmp_path / 'ours.safetensors'}",
        "--config",
        "configs/tiny.py",
    )
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and (tmp_path / "ours.json").is_file()
    r = run("--src", f"safetensors:{tmp_path / 'ours.safetensors'}", "--dst", f"open_clip:{tmp_path / 'oc'}")
    assert r.returncode == 0, r.stderr

    back, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    for (k, v), (k2, v2) in zip(sorted(src.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k


def test_safetensors_round_trip_and_errors(tmp_path):
    mc = files.load(CONFIGS / "tiny.py").model
    params = {
        k: np.random.default_rng(0).normal(size=s.shape).astype(s.dtype) for k, s in weights.expected_params(mc).items()
    }
    conversion.save(f"safetensors:{tmp_path / 'a.safetensors'}", mc, params)
    mc2, back = weights.load(f"safetensors:{tmp_path / 'a.safetensors'}")
    assert mc2.vision.variant == "atto" and set(back) == set(params)
    assert all(np.array_equal(back[k], params[k]) for k in params)

    with pytest.raises(ValueError, match="KIND:PATH"):
        weights.parse("pickle:/x")
    with pytest.raises(ValueError, match="KIND:PATH"):
        weights.parse(f"orbax:{tmp_path}", conversion.DEST_KINDS)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors file"):
        weights.load(f"safetensors:{tmp_path / 'bad.safetensors'}", mc)
    other = files.load(CONFIGS / "tiny.py").model
    other.embed_dim = 64
    (tmp_path / "a.json").unlink()
    with pytest.raises(ValueError, match=r"a\.safetensors: does not match the model config"):
        weights.load(f"safetensors:{tmp_path / 'a.safetensors'}", other)
    r = run(
        "--src",
        f"open_clip:{tmp_path / 'missing.bin'}",
        "--dst",
        f"safetensors:{tmp_path / 'x.safetensors'}",
        "--config",
        "configs/tiny.py",
    )
    assert r.returncode == 1 and "missing.bin" in r.stderr


def test_params_only_checkpoint_and_bfloat16_export(tmp_path):
    """A shareable, optimizer-free checkpoint round-trips exactly; bf16 exports halve the bytes and still
    give the same embeddings within bf16 precision (the converter checks and says so)."""
    mc = files.load(CONFIGS / "tiny.py").model
    params = {
        k: np.random.default_rng(1).normal(scale=0.05, size=s.shape).astype(s.dtype)
        for k, s in weights.expected_params(mc).items()
    }
    src = f"safetensors:{tmp_path / 'src.safetensors'}"
    conversion.save(src, mc, params)

    errors = conversion.convert(src, f"params:{tmp_path / 'shared'}")
    assert errors == {"image": 0.0, "text": 0.0}
    mc2, back = weights.load(f"params:{tmp_path / 'shared'}")  # the config travels with the weights
    assert architecture(mc2) == architecture(mc)  # run settings (dtype, drop path) are not the stored ones
    assert all(np.array_equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="already exists"):
        conversion.save(f"params:{tmp_path / 'shared'}", mc, params)

    errors = conversion.convert(src, f"safetensors:{tmp_path / 'half.safetensors'}", dtype="bfloat16")
    assert 0 < max(errors.values()) <= conversion.TOLERANCE["bfloat16"]
    full, half = (tmp_path / "src.safetensors").stat().st_size, (tmp_path / "half.safetensors").stat().st_size
    assert half < 0.55 * full


@pytest.mark.interop
@pytest.mark.slow  # ConvNeXt-Base at 224: two CLI runs and three in-process conversions, ~4-6 min on 2 cores
def test_echoclip_config_as_shipped_converts_to_every_kind_and_back(tmp_path):
    """configs/echoclip.py unchanged (bfloat16 compute, ConvNeXt-Base at 224): open_clip's convnext_base
    -> safetensors -> open_clip directory (the issue's failing command) -> params-only -> safetensors, each
    verified in float32, the weights identical at the end; open_clip loads the directory with the source's
    exact state dict; a bfloat16 export verifies within its tolerance."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")

    config = files.load(CONFIGS / "echoclip.py")
    assert config.model.dtype == "bfloat16" and config.model.vision.variant == "base"
    torch.manual_seed(0)
    src = open_clip.CLIP(**ocw.open_clip_model_cfg(config.model)).eval()
    torch.save(src.state_dict(), tmp_path / "oc.bin")
    m, back = tmp_path / "m.safetensors", tmp_path / "back"
    for a, b in ((f"open_clip:{tmp_path / 'oc.bin'}", f"safetensors:{m}"), (f"safetensors:{m}", f"open_clip:{back}")):
        r = run("--src", a, "--dst", b, "--config", "configs/echoclip.py")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "image embeddings max rel. error 0.00e+00, text 0.00e+00" in r.stdout, r.stdout
    mc = config.model
    assert conversion.convert(f"open_clip:{back}", f"params:{tmp_path / 'p'}", mc) == {"image": 0.0, "text": 0.0}
    assert conversion.convert(f"params:{tmp_path / 'p'}", f"safetensors:{tmp_path / 'm2.safetensors'}", mc) == {
        "image": 0.0,
        "text": 0.0,
    }
    _, first = weights.load(f"safetensors:{m}", mc)
    _, last = weights.load(f"safetensors:{tmp_path / 'm2.safetensors'}", mc)
    assert len(first) == len(last) and all(np.array_equal(first[k], last[k]) for k in first)

    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{back}")
    want, got = src.state_dict(), loaded.state_dict()
    assert set(want) <= set(got)
    for k, v in want.items():
        assert torch.equal(v, got[k]), k

    errors = conversion.convert(f"safetensors:{m}", f"safetensors:{tmp_path / 'half.safetensors'}", mc, "bfloat16")
    assert 0 < max(errors.values()) <= conversion.TOLERANCE["bfloat16"], errors


def _tiny_params(seed: int = 2):
    mc = files.load(CONFIGS / "tiny.py").model
    rng = np.random.default_rng(seed)
    return mc, {k: rng.normal(scale=0.05, size=s.shape).astype(s.dtype) for k, s in weights.expected_params(mc).items()}


def _files(root) -> dict:
    """{relative path: bytes} of every file under `root` (local or gs://)."""
    return {rel: storage.read_bytes(storage.join(root, rel)) for rel in storage.files_under(root)}


def test_convert_reads_and_writes_a_bucket_as_it_does_local_disk(tmp_path, bucket):
    """safetensors on gs:// -> a params-only checkpoint on gs:// (Orbax writes and reads the bucket): the weights
    come back exact, and safetensors and open_clip files written to the bucket are byte for byte those written
    to local disk (the CLI test below verifies a whole conversion between buckets)."""
    mc, params = _tiny_params()
    conversion.save(f"safetensors:{tmp_path / 'src.safetensors'}", mc, params)
    storage.copytree(tmp_path, f"{bucket}/in")
    stored, read = weights.load(f"safetensors:{bucket}/in/src.safetensors")  # through a temporary local copy
    conversion.save(f"params:{bucket}/p", stored, read)
    stored, back = weights.load(f"params:{bucket}/p")
    assert all(np.array_equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="already exists"):
        conversion.save(f"params:{bucket}/p", mc, params)
    for root in (str(tmp_path / "out"), f"{bucket}/out"):
        conversion.save(f"safetensors:{root}/m.safetensors", stored, back)
        conversion.save(f"open_clip:{root}/oc", stored, back)
    local, remote = _files(tmp_path / "out"), _files(f"{bucket}/out")
    assert sorted(remote) == ["m.json", "m.safetensors", "oc/open_clip_config.json", "oc/open_clip_model.safetensors"]
    assert remote == local
    _, again = weights.load(f"open_clip:{bucket}/out/oc", mc)  # read back through a temporary local copy
    assert all(np.array_equal(again[k], params[k]) for k in params)


def test_convert_cli_reads_a_training_workdir_on_a_bucket(tmp_path, bucket, capsys):
    """`convert --src orbax:gs://.../workdir@STEP --dst safetensors:gs://...` (a training workdir copied to the
    bucket with storage.copytree) writes the file that saving the run's weights locally writes."""
    mc, params = _tiny_params(3)
    workdir = tmp_path / "run"
    ck = checkpoint.Checkpointer(str(workdir), keep=2, async_save=False)
    tree = weights.nested({k: jnp.asarray(v) for k, v in params.items()}, string_keys=True)
    state = {"step": jnp.int32(4), "params": tree}
    ck.save(4, state, iter(grain.MapDataset.range(8).batch(2).to_iter_dataset()))
    ck.wait()
    ck.close()
    storage.copytree(workdir, f"{bucket}/run")
    conversion.save(f"safetensors:{tmp_path / 'w.safetensors'}", mc, params)  # what converting the local run gives
    argv = ["convert", "--src", f"orbax:{bucket}/run@4", "--dst", f"safetensors:{bucket}/share/w.safetensors"]
    assert convert.main([*argv, "--config", str(CONFIGS / "tiny.py")]) == 0
    assert "verified" in capsys.readouterr().out
    assert storage.read_bytes(f"{bucket}/share/w.safetensors") == (tmp_path / "w.safetensors").read_bytes()
    assert storage.load_json(f"{bucket}/share/w.json") == json.loads((tmp_path / "w.json").read_text())
