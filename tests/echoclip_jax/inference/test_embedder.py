"""echoclip_jax.inference.embedder: videos of different lengths embedded in fixed-shape batches sharded over the 8
simulated devices give each video exactly what the model gives that video alone."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echoclip_jax import models
from echoclip_jax.config import files
from echoclip_jax.inference import embedder as emb

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"

LENGTHS = [1, 7, 3, 12, 2, 9]  # a one-frame video, and lengths around the batch of 8 frames


@pytest.fixture(scope="module")
def models_by_pool():
    """{"attention": a small model whose learned temporal pool really attends, "mean": the same weights
    with EchoCLIP's mean pool} (one initialisation: it dominates these tests' time on a CPU)."""
    c = files.load(CONFIGS / "tiny.py")
    c.model.vision.image_size = 32
    c.model.vision.depthwise_impl = "lax"  # compiles faster on CPU
    c.model.embed_dim = 32
    c.model.text.layers, c.model.text.width, c.model.text.heads = 1, 32, 2
    c.model.temporal_pool = "attention"
    attention = models.build_model(c.model, rngs=nnx.Rngs(0))
    out = attention.temporal_pool.out  # the head starts as the mean (out = 0): make it attend for real
    out.set_value(jax.random.normal(jax.random.key(1), out[...].shape) * 0.3)
    attention.eval()
    mean = nnx.clone(attention)
    mean.temporal_pool = None
    return {"attention": attention, "mean": mean}


def videos(lengths=LENGTHS, size=32):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8) for t in lengths]


def alone(model, clip):
    """(frame embeddings, video embedding) of one video by the model itself, one frame per call."""
    frames = np.concatenate([np.asarray(model.encode_image(models.preprocess_images(f[None]))) for f in clip])
    return frames, np.asarray(model.pool_frames(jnp.asarray(frames)[None]))[0]


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_ragged_videos_equal_each_video_alone(models_by_pool, pool):
    """Frames of all videos share batches of 8 over 8 devices; the attention pool pads groups of videos to
    a bucket length with a mask. Each video still gets what the model gives it alone."""
    assert len(jax.devices()) == 8  # batches are sharded over all of them
    model = models_by_pool[pool]
    e = emb.Embedder(model, batch_size=8)
    clips = videos()
    out = e.videos(iter(clips))
    assert list(out.lengths) == LENGTHS and out.frames.shape == (sum(LENGTHS), 32)
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    for clip, start, video in zip(clips, starts, out.videos):
        frames, pooled = alone(model, clip)
        np.testing.assert_allclose(out.frames[start : start + len(clip)], frames, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(video, pooled, rtol=1e-4, atol=1e-5)
    # one compiled image-tower program for every length (fixed batch shape, frames laid end to end)
    if hasattr(e._images, "_cache_size"):
        assert e._images._cache_size() == 1
    if pool == "attention":  # the pool is not the mean: the masking was really exercised
        mean = emb.Embedder(models_by_pool["mean"], batch_size=8).pool(out.frames, out.lengths)
        assert np.abs(out.videos - mean).max() > 1e-3


def test_streaming_chunks_do_not_change_the_result(models_by_pool, monkeypatch):
    """Frames reach the devices in chunks as videos arrive; a chunk boundary inside a video changes nothing."""
    whole = emb.Embedder(models_by_pool["mean"], batch_size=8).videos(videos())
    monkeypatch.setattr(emb, "CHUNK_BATCHES", 1)
    chunked = emb.Embedder(models_by_pool["mean"], batch_size=8).videos(videos())
    np.testing.assert_allclose(chunked.frames, whole.frames, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked.videos, whole.videos, rtol=1e-5, atol=1e-6)
    assert emb.bucket(1) == 8 and emb.bucket(9) == 16 and emb.bucket(16) == 16


def test_bad_videos_are_named(models_by_pool):
    e = emb.Embedder(models_by_pool["mean"], batch_size=8)
    with pytest.raises(ValueError, match="video 1: expected uint8 frames"):
        e.videos([videos([2])[0], np.zeros((0, 32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="video 1: frames of .*resize"):
        e.videos([videos([2])[0], videos([2], size=16)[0]])
    empty = e.videos([])
    assert empty.frames.shape == (0, 32) and empty.videos.shape == (0, 32)


def test_masked_mean_is_the_mean_of_the_real_frames():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    mask = jnp.array([[True, False, False], [True, True, True]])
    got = np.asarray(models.clip.masked_mean(x, mask))
    np.testing.assert_allclose(got, [np.asarray(x[0, 0]), np.asarray(x[1].mean(0))])
