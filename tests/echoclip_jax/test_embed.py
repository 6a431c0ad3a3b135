"""The embed CLI: images, videos and texts to L2-normalised .npy embeddings equal to the model's own."""

import io
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from echoclip_jax import aot, convert, embed, interpret
from echoclip_jax.config import files
from echoclip_jax.models import preprocess_images
from echoclip_jax.runtime import storage
from echoclip_jax.weights import conversion
from echoclip_jax.weights import loader as weights

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    mc = files.load(CONFIGS / "tiny.py").model
    params = {
        k: (np.random.default_rng(1).normal(size=s.shape) * 0.05).astype(s.dtype)
        for k, s in weights.expected_params(mc).items()
    }
    conversion.save(f"safetensors:{d / 'm.safetensors'}", mc, params)
    return d, weights.make_model(mc, params)


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "echoclip_jax.embed", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_embed_videos_and_texts(checkpoint, tmp_path):
    d, model = checkpoint
    videos = np.random.default_rng(0).integers(0, 256, (3, 2, 64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "v.npy", videos)
    r = run(
        "--checkpoint",
        f"safetensors:{d / 'm.safetensors'}",
        "--config",
        "configs/tiny.py",
        "--images",
        str(tmp_path / "v.npy"),
        "--out",
        str(tmp_path / "ve.npy"),
        "--batch_size",
        "2",
    )
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "ve.npy")
    frames = np.asarray(model.encode_image(preprocess_images(videos.reshape(6, 64, 64, 3)))).reshape(3, 2, -1)
    mean = frames.mean(1)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-4, atol=1e-5)

    (tmp_path / "t.txt").write_text("severe aortic stenosis\nnormal left ventricular function\n")
    r = run(
        "--checkpoint",
        f"safetensors:{d / 'm.safetensors'}",
        "--config",
        "configs/tiny.py",
        "--texts",
        str(tmp_path / "t.txt"),
        "--out",
        str(tmp_path / "te.npy"),
    )
    assert r.returncode == 0, r.stderr
    te = np.load(tmp_path / "te.npy")
    assert te.shape == (2, 128) and not np.allclose(te[0], te[1])
    np.testing.assert_allclose(np.linalg.norm(te, axis=-1), 1.0, rtol=1e-5)


def test_embed_rejects_float_images(checkpoint, tmp_path):
    d, _ = checkpoint
    np.save(tmp_path / "f.npy", np.zeros((1, 64, 64, 3), np.float32))
    r = run(
        "--checkpoint",
        f"safetensors:{d / 'm.safetensors'}",
        "--config",
        "configs/tiny.py",
        "--images",
        str(tmp_path / "f.npy"),
        "--out",
        str(tmp_path / "o.npy"),
    )
    assert r.returncode == 1 and "f.npy: expected uint8" in r.stderr


def test_embed_videos_of_different_lengths_from_npz(checkpoint, tmp_path):
    """Videos of 1, 3 and 2 frames in one .npz: each row is the model's own mean of that video's frames."""
    d, model = checkpoint
    rng = np.random.default_rng(4)
    clips = [rng.integers(0, 256, (t, 64, 64, 3), dtype=np.uint8) for t in (1, 3, 2)]
    np.savez(tmp_path / "v.npz", *clips)
    r = run(
        "--checkpoint",
        f"safetensors:{d / 'm.safetensors'}",
        "--config",
        "configs/tiny.py",
        "--images",
        str(tmp_path / "v.npz"),
        "--out",
        str(tmp_path / "ve.npy"),
        "--batch_size",
        "8",
    )
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "ve.npy")
    frames = np.asarray(model.encode_image(preprocess_images(np.concatenate(clips))))
    want = [frames[a:b].mean(0) for a, b in ((0, 1), (1, 4), (4, 6))]
    want = np.stack(want) / np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.savez(tmp_path / "bad.npz", clips[0], np.zeros((2, 64, 64, 3), np.float32))
    r = run(
        "--checkpoint",
        f"safetensors:{d / 'm.safetensors'}",
        "--config",
        "configs/tiny.py",
        "--images",
        str(tmp_path / "bad.npz"),
        "--out",
        str(tmp_path / "o.npy"),
    )
    assert r.returncode == 1 and "bad.npz: array 'arr_1': expected uint8" in r.stderr


def test_embed_reads_and_writes_a_bucket(checkpoint, tmp_path, bucket):
    """Checkpoint, videos, texts and output all on gs://: the embeddings read back from the bucket equal those
    of the same command on local disk."""
    d, _ = checkpoint
    clips = [np.random.default_rng(6).integers(0, 256, (t, 64, 64, 3), dtype=np.uint8) for t in (2, 1)]
    np.savez(tmp_path / "v.npz", *clips)
    (tmp_path / "t.txt").write_text("severe aortic stenosis\r\nnormal left ventricular function\n")
    storage.copytree(d, f"{bucket}/ckpt")
    storage.copytree(tmp_path, f"{bucket}/in")
    for kind, flag, name in (("images", "--images", "v.npz"), ("texts", "--texts", "t.txt")):
        got = {}
        for root, ckpt in ((str(tmp_path), str(d)), (bucket, f"{bucket}/ckpt")):
            source = f"{root}/in/{name}" if root == bucket else f"{root}/{name}"
            argv = ["embed", "--checkpoint", f"safetensors:{ckpt}/m.safetensors", "--config", str(CONFIGS / "tiny.py")]
            assert embed.main([*argv, flag, source, "--out", f"{root}/out/{kind}"]) == 0  # np.save adds .npy
            got[root] = np.load(io.BytesIO(storage.read_bytes(f"{root}/out/{kind}.npy")))
        local, remote = got.values()
        assert remote.shape == (len(clips) if kind == "images" else 2, 128)
        np.testing.assert_array_equal(remote, local)


def test_path_flags_with_an_unsupported_scheme_or_a_missing_bucket_exit_2(gcs_server, bucket, capsys):
    """Every file flag of convert, embed, interpret and aot (and the PATH of a KIND:PATH flag) is checked before
    anything runs: a scheme other than gs://, or a bucket that does not exist, exits 2 naming the flag."""
    tiny = str(CONFIGS / "tiny.py")
    embed_base = ["--config", tiny, "--checkpoint", f"safetensors:{bucket}/m.safetensors", "--texts", f"{bucket}/t"]
    interpret_base = ["--config", tiny, "--checkpoint", "safetensors:m.safetensors", "--prompt", "p"]
    cases = [
        (convert, ["--src", "safetensors:s3://b/m.safetensors", "--dst", f"params:{bucket}/p"], "--src=s3://b/m"),
        (
            convert,
            ["--src", "safetensors:m.safetensors", "--dst", "params:gs://no-such-bucket-x1/p"],
            "--dst=gs://no-such",
        ),
        (convert, ["--src", "pickle:m", "--dst", f"params:{bucket}/p"], "--src: 'pickle:m': expected KIND:PATH"),
        (embed, [*embed_base, "--out", "s3://b/e.npy"], "--out=s3://b/e.npy: the scheme s3://"),
        (embed, [*embed_base[:4], "--images", "gs://no-such-bucket-x1/v.npy", "--out", "e.npy"], "--images=gs://"),
        (embed, [*embed_base[:2], "--checkpoint", "orbax:hdfs://n/run", *embed_base[4:], "--out", "e"], "--checkpoint"),
        (interpret, [*interpret_base, "--video", "v.npy", "--video", "s3://b/v.npy", "--out", "o"], "--video=s3://"),
        (interpret, [*interpret_base, "--data_dir", "d", "--out", "gs://no-such-bucket-x1/o"], "--out=gs://no-such"),
        (aot, ["--config", tiny, "--topology", "v5e-8", "--json", "s3://b/r.json"], "--json=s3://b/r.json"),
    ]
    for module, args, message in cases:
        assert module.main([module.__name__.split(".")[-1], *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
