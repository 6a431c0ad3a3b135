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
from echoclip_jax.inference.embedder import embed_images, embed_texts, embed_videos, read_images
from echoclip_jax.runtime import logs
from echoclip_jax.tokenizers import from_config
from echoclip_jax.weights.loader import load_model

FLAGS = flags.FLAGS


def main(argv):
    del argv

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
