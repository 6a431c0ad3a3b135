"""The convert CLI: open_clip <-> safetensors round trips that open_clip itself reads, and clear errors."""
import subprocess
import sys

import numpy as np
import pytest

from echoclip_jax import convert

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, "-m", "echoclip_jax.convert", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.interop
@pytest.mark.slow  # two CLI runs with JAX start-up and verification: ~60-100 s on the 2-core box
def test_cli_round_trip_open_clip_file_to_safetensors_to_open_clip_dir(tmp_path):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from configs import tiny
    from echoclip_jax import open_clip_weights as ocw
    torch.manual_seed(0)
    src = open_clip.CLIP(**ocw.open_clip_model_cfg(tiny.get_config().model)).eval()
    torch.save(src.state_dict(), tmp_path / "laion.bin")

    r = run("--src", f"open_clip:{tmp_path / 'laion.bin'}", "--dst", f"safetensors:{tmp_path / 'ours.safetensors'}",
            "--config", "configs/tiny.py")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and (tmp_path / "ours.json").is_file()
    r = run("--src", f"safetensors:{tmp_path / 'ours.safetensors'}", "--dst", f"open_clip:{tmp_path / 'oc'}")
    assert r.returncode == 0, r.stderr

    back, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    for (k, v), (k2, v2) in zip(sorted(src.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k


def test_safetensors_round_trip_and_errors(tmp_path):
    from configs import tiny
    mc = tiny.get_config().model
    params = {k: np.random.default_rng(0).normal(size=s.shape).astype(s.dtype)
              for k, s in convert.expected_params(mc).items()}
    convert.save(f"safetensors:{tmp_path / 'a.safetensors'}", mc, params)
    mc2, back = convert.load(f"safetensors:{tmp_path / 'a.safetensors'}")
    assert mc2.vision.variant == "atto" and set(back) == set(params)
    assert all(np.array_equal(back[k], params[k]) for k in params)

    with pytest.raises(ValueError, match="KIND:PATH"):
        convert.parse_spec("pickle:/x")
    with pytest.raises(ValueError, match="KIND:PATH"):
        convert.parse_spec(f"orbax:{tmp_path}", convert.DEST_KINDS)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors file"):
        convert.load(f"safetensors:{tmp_path / 'bad.safetensors'}", mc)
    other = tiny.get_config().model
    other.embed_dim = 64
    (tmp_path / "a.json").unlink()
    with pytest.raises(ValueError, match=r"a\.safetensors: does not match the model config"):
        convert.load(f"safetensors:{tmp_path / 'a.safetensors'}", other)
    r = run("--src", f"open_clip:{tmp_path / 'missing.bin'}", "--dst", f"safetensors:{tmp_path / 'x.safetensors'}",
            "--config", "configs/tiny.py")
    assert r.returncode == 1 and "missing.bin" in r.stderr


def test_params_only_checkpoint_and_bfloat16_export(tmp_path):
    """A shareable, optimizer-free checkpoint round-trips exactly; bf16 exports halve the bytes and still
    give the same embeddings within bf16 precision (the converter checks and says so)."""
    from configs import tiny
    mc = tiny.get_config().model
    params = {k: np.random.default_rng(1).normal(scale=0.05, size=s.shape).astype(s.dtype)
              for k, s in convert.expected_params(mc).items()}
    src = f"safetensors:{tmp_path / 'src.safetensors'}"
    convert.save(src, mc, params)

    errors = convert.convert(src, f"params:{tmp_path / 'shared'}")
    assert errors == {"image": 0.0, "text": 0.0}
    mc2, back = convert.load(f"params:{tmp_path / 'shared'}")  # the config travels with the weights
    assert mc2.to_dict() == mc.to_dict()
    assert all(np.array_equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="already exists"):
        convert.save(f"params:{tmp_path / 'shared'}", mc, params)

    errors = convert.convert(src, f"safetensors:{tmp_path / 'half.safetensors'}", dtype="bfloat16")
    assert 0 < max(errors.values()) <= convert.TOLERANCE["bfloat16"]
    full, half = (tmp_path / "src.safetensors").stat().st_size, (tmp_path / "half.safetensors").stat().st_size
    assert half < 0.55 * full
