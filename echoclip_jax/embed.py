"""Embed images, videos or texts with a checkpoint: L2-normalised embeddings to a .npy file.

    python -m echoclip_jax.embed --checkpoint KIND:PATH --config CONFIG (--images X.npy|X.npz | --texts X.txt)
        --out Y.npy

Images: uint8 RGB `.npy` (N, H, W, 3). Videos: `.npy` (N, T, H, W, 3) when all have T frames, or `.npz`
with one uint8 (T_i, H, W, 3) array per video, any T_i (real videos differ in length; `np.savez(path,
*videos)` keeps their order, which is the order of the output rows). A video's embedding is its frames'
embeddings pooled by the model's temporal pool (EchoCLIP: their mean). CLIP normalisation is applied
here. Texts: one per line, tokenised by the config's tokenizer. KIND as in `echoclip_jax.weights.loader`, whose
`load` decides the model config (architecture from the config stored with the weights, which must agree
with --config; compute dtype and other run settings from --config). Batches are jitted with fixed shapes
and sharded over all local devices (`echoclip_jax.inference.embedder`). Every file flag (and the PATH of
--checkpoint) is a local path or a gs:// URL.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from echoclip_jax.config.validation import validate
from echoclip_jax.inference.embedder import embed_images, embed_texts, embed_videos, read_images
from echoclip_jax.runtime import cli, storage
from echoclip_jax.tokenizers import from_config
from echoclip_jax.weights import loader as load_weights
from echoclip_jax.weights.loader import load_model

FLAGS = cli.flag_values()
flags.DEFINE_string(
    "checkpoint",
    None,
    "KIND:PATH[@STEP] (see echoclip_jax.weights.loader), PATH a local path or gs:// URL",
    flag_values=FLAGS,
)
config_flags.DEFINE_config_file("config", None, "configs/*.py", lock_config=False, flag_values=FLAGS)
flags.DEFINE_string(
    "images",
    None,
    "uint8 .npy (N, H, W, 3) or (N, T, H, W, 3), or .npz of videos (T_i, H, W, 3) of any lengths "
    "(local path or gs:// URL)",
    flag_values=FLAGS,
)
flags.DEFINE_string("texts", None, "UTF-8 text file, one text per line (local path or gs:// URL)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output .npy (N, embed_dim) float32 (local path or gs:// URL)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "frames (or texts) per jitted batch, over all devices", flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "config", "out"], flag_values=FLAGS)


def _embed(f) -> None:
    if (f.images is None) == (f.texts is None):
        raise cli.UsageError("pass exactly one of --images or --texts")
    try:
        load_weights.check_spec(f.checkpoint, "--checkpoint")
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    validate(f.config, training=False)
    model = load_model(f.checkpoint, f.config.model)
    if f.images is not None:
        images = read_images(f.images)
        if isinstance(images, list):
            result = embed_videos(model, images, f.batch_size, source=f.images)
        else:
            result = embed_images(model, images, f.batch_size, source=f.images)
    else:
        lines = io.StringIO(storage.read_text(f.texts), newline=None)  # universal newlines, as open() reads
        texts = [line.rstrip("\n") for line in lines if line.strip()]
        if not texts:
            raise ValueError(f"{f.texts}: no texts (one per line expected)")
        result = embed_texts(model, from_config(f.config.tokenizer), texts, f.batch_size)
    out = f.out if f.out.endswith(".npy") else f.out + ".npy"  # the name np.save would give it
    buffer = io.BytesIO()
    np.save(buffer, result)
    storage.write_bytes(out, buffer.getvalue())
    print(f"wrote {result.shape[0]} embeddings of dim {result.shape[1]} to {out}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(_embed, FLAGS, argv, name="embed", doc=__doc__, paths=("images", "texts", "out"))


if __name__ == "__main__":
    sys.exit(main())
