"""Embed images, videos or texts with a checkpoint: L2-normalised embeddings to a .npy file.

    python -m echoclip_jax.embed --checkpoint KIND:PATH --config CONFIG (--images X.npy|X.npz | --texts X.txt) --out Y.npy

Images: uint8 RGB `.npy` (N, H, W, 3). Videos: `.npy` (N, T, H, W, 3) when all have T frames, or `.npz`
with one uint8 (T_i, H, W, 3) array per video, any T_i (real videos differ in length; `np.savez(path,
*videos)` keeps their order, which is the order of the output rows). A video's embedding is its frames'
embeddings pooled by the model's temporal pool (EchoCLIP: their mean). CLIP normalisation is applied
here. Texts: one per line, tokenised by the config's tokenizer. KIND as in `echoclip_jax.weights`, whose
`load` decides the model config (architecture from the config stored with the weights, which must agree
with --config; compute dtype and other run settings from --config). Batches are jitted with fixed shapes
and sharded over all local devices (`echoclip_jax.inference.embedder`).
"""
from __future__ import annotations

import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from echoclip_jax.config.validation import validate
from echoclip_jax.weights.loader import load_model
from echoclip_jax.inference.embedder import Embedder
from echoclip_jax.models import CLIP


def _check(video, source: str, what: str) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
        raise ValueError(f"{source}: {what}: expected uint8 frames (T >= 1, H, W, 3), got {video.dtype} "
                         f"{video.shape}")
    return video


def embed_images(model: CLIP, images: np.ndarray, batch_size: int = 32, source: str = "images") -> np.ndarray:
    """uint8 (N, H, W, 3) images or (N, T, H, W, 3) videos -> float32 (N, embed_dim), L2-normalised."""
    if images.dtype != np.uint8 or images.ndim not in (4, 5) or images.shape[-1] != 3:
        raise ValueError(f"{source}: expected uint8 (N, H, W, 3) images or (N, T, H, W, 3) videos, "
                         f"got {images.dtype} {images.shape}")
    if images.ndim == 5:
        return embed_videos(model, list(images), batch_size, source)
    return Embedder(model, batch_size=batch_size).images(images)


def embed_videos(model: CLIP, videos, batch_size: int = 32, source: str = "videos") -> np.ndarray:
    """Videos uint8 (T_i, H, W, 3) of any lengths -> float32 (N, embed_dim), L2-normalised."""
    videos = [_check(v, source, f"video {i}") for i, v in enumerate(videos)]
    return Embedder(model, batch_size=batch_size).videos(videos).videos


def embed_texts(model: CLIP, tokenizer, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """list of N strings -> float32 (N, embed_dim), L2-normalised."""
    return Embedder(model, tokenizer, batch_size=batch_size).texts(texts)


def read_images(path: str):
    """A .npy array, or the arrays of a .npz in archive order (one video each)."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if not names:
                    raise ValueError(f"{path}: the archive holds no arrays (one per video expected)")
                return [_check(archive[n], path, f"array {n!r}") for n in names]
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable .npy/.npz array ({e})") from e


FLAGS = flags.FLAGS


def main(argv):
    del argv
    from echoclip_jax.runtime import logs

    logs.setup()
    config = FLAGS.config
    if (FLAGS.images is None) == (FLAGS.texts is None):
        print("embed: error: pass exactly one of --images or --texts", file=sys.stderr)
        return 1
    try:
        validate(config, training=False)
        model = load_model(FLAGS.checkpoint, config.model)
        if FLAGS.images is not None:
            images = read_images(FLAGS.images)
            if isinstance(images, list):
                result = embed_videos(model, images, FLAGS.batch_size, source=FLAGS.images)
            else:
                result = embed_images(model, images, FLAGS.batch_size, source=FLAGS.images)
        else:
            from echoclip_jax.tokenizers import from_config
            with open(FLAGS.texts, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
            if not texts:
                raise ValueError(f"{FLAGS.texts}: no texts (one per line expected)")
            result = embed_texts(model, from_config(config.tokenizer), texts, FLAGS.batch_size)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 1
    np.save(FLAGS.out, result)
    print(f"wrote {result.shape[0]} embeddings of dim {result.shape[1]} to {FLAGS.out}")
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "KIND:PATH[@STEP] (see echoclip_jax.weights)", required=True)
    config_flags.DEFINE_config_file("config", None, "configs/*.py", lock_config=False)
    flags.DEFINE_string("images", None, "uint8 .npy (N, H, W, 3) or (N, T, H, W, 3), or .npz of videos "
                                        "(T_i, H, W, 3) of any lengths")
    flags.DEFINE_string("texts", None, "UTF-8 text file, one text per line")
    flags.DEFINE_string("out", None, "output .npy (N, embed_dim) float32", required=True)
    flags.DEFINE_integer("batch_size", 32, "frames (or texts) per jitted batch, over all devices")
    flags.mark_flag_as_required("config")
    app.run(main)
