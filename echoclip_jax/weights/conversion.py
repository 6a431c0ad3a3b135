"""Writing model weights in another format, then proving the conversion kept the model's outputs.

Destinations: `open_clip` (a directory that `open_clip.create_model_and_transforms("local-dir:DIR")`
loads), `safetensors` (X.safetensors + X.json) and `params` (a params-only Orbax checkpoint, the small
optimizer-free form to share or to start a run from); sources are whatever `echoclip_jax.weights.loader`
reads. After writing, the destination is read back and the image and text embeddings of a fixed input are
compared with the source's, both computed in float32 whatever the config's compute dtype (the check
compares weights; tolerance 1e-5 for float32 weights, 2e-2 for bfloat16).

Every destination may be a local path or a gs:// URL: safetensors files are written locally and uploaded
whole (`storage.local_output`), params-only checkpoints by Orbax straight to the bucket.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from echoclip_jax.config.model import for_verification
from echoclip_jax.models import CLIP, preprocess_images
from echoclip_jax.runtime import storage
from echoclip_jax.weights import loader as weights
from echoclip_jax.weights import open_clip as ocw

DEST_KINDS = ("open_clip", "safetensors", "params")
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def _write_safetensors(path: str, model_config, params: dict) -> None:
    with storage.local_output(path) as local:
        save_file({weights.flat_name(k): np.array(v, order="C") for k, v in params.items()}, local)
    storage.dump_json(weights.safetensors_json(path), {"model": model_config.to_dict()}, indent=2)


def _write_open_clip(path: str, model_config, params: dict) -> None:
    ocw.write_open_clip_dir(params, model_config, path)


def _write_params_only(path: str, model_config, params: dict) -> None:
    if storage.exists(path):
        raise ValueError(f"{path}: already exists; choose a new directory for the params-only checkpoint")
    ocp.PyTreeCheckpointer().save(storage.path(path) / "params", weights.nested(params, string_keys=True))
    storage.dump_json(storage.join(path, weights.PARAMS_CONFIG), {"model": model_config.to_dict()}, indent=2)


WRITERS = {"open_clip": _write_open_clip, "safetensors": _write_safetensors, "params": _write_params_only}


def save(spec: str, model_config, params: dict, dtype: str = "float32") -> None:
    """Writes `params` as KIND:PATH, floating-point weights cast to `dtype`."""
    dst = weights.parse(spec, DEST_KINDS)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cast = {
        k: np.asarray(v).astype(DTYPES[dtype]) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
        for k, v in params.items()
    }
    WRITERS[dst.kind](dst.path, model_config, cast)


def fixed_inputs(model_config, batch: int = 2):
    """A deterministic image batch and token batch (ending in the config's end-of-text token)."""
    rng = np.random.default_rng(0)
    size = model_config.vision.image_size
    images = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    tc = model_config.text
    eos = tc.eos_id if tc.pool == "eos" else tc.vocab_size - 1
    tokens = rng.integers(1, min(tc.vocab_size - 1, eos), size=(batch, tc.context_length)).astype(np.int32)
    tokens[:, 5:] = 0
    tokens[:, 5] = eos
    return preprocess_images(images), jnp.asarray(tokens)


def compare_embeddings(a: CLIP, b: CLIP, model_config) -> dict:
    """Max relative difference of b's un-normalised image and text embeddings from a's on fixed inputs."""
    images, tokens = fixed_inputs(model_config)
    out = {}
    for name, fa, fb, x in (
        ("image", a.encode_image, b.encode_image, images),
        ("text", a.encode_text, b.encode_text, tokens),
    ):
        ea, eb = np.asarray(fa(x, normalize=False)), np.asarray(fb(x, normalize=False))
        out[name] = float(np.max(np.abs(ea - eb)) / max(float(np.max(np.abs(ea))), 1e-12))
    return out


def convert(src: str, dst: str, model_config=None, dtype: str = "float32") -> dict:
    """Converts src -> dst and returns the max relative embedding error of dst vs src (raises above the
    dtype's tolerance). Both are run in float32 (`model_config.for_verification`): the check compares
    weights, not compute precisions."""
    model_config, params = weights.load(src, model_config)
    save(dst, model_config, params, dtype)
    dst_path = weights.parse(dst, DEST_KINDS).path
    check = for_verification(model_config)
    _, written = weights.load(dst, check)
    errors = compare_embeddings(weights.make_model(check, params), weights.make_model(check, written), check)
    tolerance = TOLERANCE[dtype]
    for name, err in errors.items():
        if not err <= tolerance:
            raise RuntimeError(
                f"{dst_path}: {name} embeddings differ from the source's by {err:.3g} (relative, "
                f"float32 compute; tolerance {tolerance:g} for {dtype} weights)"
            )
    return errors
