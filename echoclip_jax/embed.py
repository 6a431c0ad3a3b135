"""Embed images, videos or texts with a checkpoint: L2-normalised embeddings to a .npy file.

    python -m echoclip_jax.embed --checkpoint KIND:PATH --config CONFIG (--images X.npy | --texts X.txt) --out Y.npy

Images: uint8 RGB (N, H, W, 3), or videos (N, T, H, W, 3) embedded as the mean of their frame embeddings
(the model's temporal pooling); CLIP normalisation is applied here. Texts: one per line, tokenised by
the config's tokenizer. KIND as in `echoclip_jax.convert`.
"""
from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from echoclip_jax.convert import load_model
from echoclip_jax.models import CLIP, preprocess_images


def embed_images(model: CLIP, images: np.ndarray, batch_size: int = 32, source: str = "images") -> np.ndarray:
    """uint8 (N, H, W, 3) or (N, T, H, W, 3) -> float32 (N, embed_dim), L2-normalised."""
    if images.dtype != np.uint8 or images.ndim not in (4, 5) or images.shape[-1] != 3:
        raise ValueError(f"{source}: expected uint8 (N, H, W, 3) images or (N, T, H, W, 3) videos, "
                         f"got {images.dtype} {images.shape}")
    fn = nnx.jit(lambda m, x: m.encode_video(preprocess_images(x)) if x.ndim == 5
                 else m.encode_image(preprocess_images(x)))
    return _batched(lambda x: fn(model, x), images, batch_size, model.embed_dim)


def embed_texts(model: CLIP, tokenizer, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """list of N strings -> float32 (N, embed_dim), L2-normalised."""
    tokens = np.asarray(tokenizer.encode(texts), np.int32)
    fn = nnx.jit(lambda m, t: m.encode_text(t))
    return _batched(lambda t: fn(model, t), tokens, batch_size, model.embed_dim)


def _batched(fn, x: np.ndarray, batch_size: int, dim: int) -> np.ndarray:
    """Applies fn over fixed-size batches (the last one padded) so at most two shapes are compiled."""
    out = np.zeros((len(x), dim), np.float32)
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and len(x) > batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out[start:start + n] = np.asarray(jax.device_get(fn(chunk)))[:n]
    return out


FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config
    if (FLAGS.images is None) == (FLAGS.texts is None):
        print("embed: error: pass exactly one of --images or --texts", file=sys.stderr)
        return 1
    try:
        model = load_model(FLAGS.checkpoint, config.model)
        if FLAGS.images is not None:
            try:
                images = np.load(FLAGS.images, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"{FLAGS.images}: not a readable .npy array ({e})") from e
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
    flags.DEFINE_string("checkpoint", None, "KIND:PATH (see echoclip_jax.convert)", required=True)
    config_flags.DEFINE_config_file("config", None, "configs/*.py", lock_config=False)
    flags.DEFINE_string("images", None, "uint8 .npy (N, H, W, 3) or (N, T, H, W, 3)")
    flags.DEFINE_string("texts", None, "UTF-8 text file, one text per line")
    flags.DEFINE_string("out", None, "output .npy (N, embed_dim) float32", required=True)
    flags.DEFINE_integer("batch_size", 32, "images (or videos) per forward pass")
    flags.mark_flag_as_required("config")
    app.run(main)
