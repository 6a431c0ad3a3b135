"""Convert model weights between formats, then prove the conversion kept the model's outputs.

    python -m echoclip_jax.convert --src KIND:PATH --dst KIND:PATH [--config CONFIG]

Kinds: `open_clip` (a directory with open_clip_config.json + weights, as
`open_clip.create_model_and_transforms("local-dir:DIR")` loads; as a source also a bare state-dict file
.safetensors/.bin/.pt, described by the open_clip_config.json beside it or by --config), `safetensors`
(our parameter names in one file + a JSON of `config.model` beside it: X.safetensors + X.json), and, as
sources, `orbax` (a training checkpoint or workdir, `W@STEP` for one step, read through
`echoclip_jax.checkpoint.restore_params` with --config) and `params` (a params-only Orbax checkpoint: a
directory holding the parameter tree and `echoclip_model.json`, the small, optimizer-free form to share or
to start a run from; also a destination). `--dtype bfloat16` halves the written weights.

Which config describes the weights when the source stores one and --config is given too: the rule of
`echoclip_jax.model_config` (architecture from the stored config, which must agree with --config; run
settings such as the compute dtype from --config). `load` is the one loader of weights that evaluate,
embed, interpret and train's `init` use as well.

After writing, the destination is read back and the image and text embeddings of a fixed input are
compared with the source's, both computed in float32 whatever the config's compute dtype (the check
compares weights; tolerance 1e-5 for float32 weights, 2e-2 for bfloat16).
"""
from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from echoclip_jax import open_clip_weights as ocw
from echoclip_jax.model_config import for_verification, resolve as resolve_model_config
from echoclip_jax.models import CLIP, build_model, preprocess_images

SOURCE_KINDS = ("open_clip", "safetensors", "orbax", "params")
DEST_KINDS = ("open_clip", "safetensors", "params")
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
PARAMS_CONFIG = "echoclip_model.json"  # beside the parameter tree of a params-only checkpoint
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                           "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


def parse_spec(spec: str, kinds=SOURCE_KINDS) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in kinds:
        raise ValueError(f"{spec!r}: expected KIND:PATH with KIND one of {', '.join(kinds)}")
    return kind, path


def expected_params(model_config) -> dict:
    """{param path: ShapeDtypeStruct} of the model `model_config` builds (no memory allocated)."""
    abstract = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def make_model(model_config, flat_params: dict) -> CLIP:
    """Builds the model and loads `flat_params` {path: array} into it, in eval mode."""
    model = build_model(model_config, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.from_flat_state({k: jnp.asarray(v) for k, v in flat_params.items()}))
    model.eval()
    return model


def _flat_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


# ---------------------------------------------------------------- readers: -> flat params

def _open_clip_files(path: str) -> tuple[str, str]:
    """(weights file, the open_clip_config.json that would describe it) of an open_clip source."""
    if os.path.isdir(path):
        weights = [os.path.join(path, f) for f in _OPEN_CLIP_WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
        if not weights:
            raise FileNotFoundError(f"{path}: no open_clip weights ({', '.join(_OPEN_CLIP_WEIGHT_FILES)})")
        return weights[0], os.path.join(path, "open_clip_config.json")
    return path, os.path.join(os.path.dirname(path), "open_clip_config.json")


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def _ours(path: str) -> ml_collections.ConfigDict:
    """The model config stored in one of our JSON files ({"model": config.model})."""
    stored = _read_json(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'model' config")
    return ml_collections.ConfigDict(stored["model"])


def _split_step(path: str) -> tuple[str, int | None]:
    """"W@200" -> ("W", 200): one step of a training workdir (as evaluate's sweeps name them)."""
    m = re.fullmatch(r"(.+)@(\d+)", path)
    if m and not os.path.exists(path):
        return m.group(1), int(m.group(2))
    return path, None


def stored_config(kind: str, path: str, given=None):
    """(the model config a KIND:PATH source carries, or None; the file it came from, or PATH)."""
    if kind == "open_clip":
        _, config_path = _open_clip_files(path)
        if not os.path.isfile(config_path):
            return None, path
        return ocw.model_config_from_open_clip(_read_json(config_path), base=given, source=config_path), config_path
    if kind == "safetensors":
        return (_ours(_json_path(path)), _json_path(path)) if os.path.isfile(_json_path(path)) else (None, path)
    config_path = os.path.join(_split_step(path)[0], PARAMS_CONFIG)  # orbax / params
    return (_ours(config_path), config_path) if os.path.isfile(config_path) else (None, path)


def _read_open_clip(path: str, model_config):
    weights, _ = _open_clip_files(path)
    return ocw.import_state_dict(ocw.read_state_dict(weights), expected_params(model_config), model_config,
                                 source=weights)


def _json_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def _read_safetensors(path: str, model_config):
    from safetensors.numpy import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    expected = expected_params(model_config)
    names = {_flat_name(k): k for k in expected}
    problems = [f"missing {n}" for n in names if n not in tensors]
    problems += [f"unexpected {n}" for n in tensors if n not in names]
    problems += [f"{n}: shape {tensors[n].shape}, the config needs {expected[k].shape}"
                 for n, k in names.items() if n in tensors and tensors[n].shape != expected[k].shape]
    if problems:
        raise ValueError(f"{path}: does not match the model config: {'; '.join(problems[:12])}")
    return {k: tensors[n].astype(expected[k].dtype) for n, k in names.items()}


def _nested(flat: dict) -> dict:
    """{("a", "b", 0): x} -> {"a": {"b": {"0": x}}}: the tree Orbax stores."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def _read_params_only(path: str, model_config):
    import orbax.checkpoint as ocp
    expected = expected_params(model_config)
    item = _nested({k: 0 for k in expected})
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        tree = ocp.PyTreeCheckpointer().restore(os.path.join(path, "params"), args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args))
    except Exception as e:  # Orbax raises many types for a tree that does not fit
        raise ValueError(f"{path}: params-only checkpoint does not match the model config ({e})") from e
    flat = {}
    for k, spec in expected.items():
        node = tree
        for key in k:
            node = node[str(key)]
        flat[k] = np.asarray(node).astype(spec.dtype)
    return flat


def _read_checkpoint(path: str, model_config):
    path, step = _split_step(path)
    if os.path.isfile(os.path.join(path, PARAMS_CONFIG)):
        return _read_params_only(path, model_config)
    try:
        from echoclip_jax.checkpoint import restore_params
    except ImportError as e:
        raise ImportError(f"{path}: reading Orbax checkpoints needs echoclip_jax.checkpoint ({e})") from e
    restored = restore_params(path, step=step)
    if isinstance(restored, nnx.Module):
        restored = nnx.state(restored, nnx.Param)
    if isinstance(restored, nnx.State):
        leaves = {_flat_name(k): v for k, v in nnx.to_flat_state(restored)}
    else:
        leaves = {"/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in kp): v
                  for kp, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    expected = expected_params(model_config)
    missing = [_flat_name(k) for k in expected if _flat_name(k) not in leaves]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks parameters of the config's model: {', '.join(missing[:8])}")
    problems = [f"{_flat_name(k)}: shape {np.shape(leaves[_flat_name(k)])}, the config needs {s.shape}"
                for k, s in expected.items() if tuple(np.shape(leaves[_flat_name(k)])) != tuple(s.shape)]
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the model config: {'; '.join(problems[:8])}")
    return {k: np.asarray(jax.device_get(leaves[_flat_name(k)])).astype(s.dtype) for k, s in expected.items()}


READERS = {"open_clip": _read_open_clip, "safetensors": _read_safetensors,
           "orbax": _read_checkpoint, "params": _read_checkpoint}


def load(spec: str, model_config=None):
    """KIND:PATH -> (model config, flat params {path tuple: numpy array}); the one loader of weights.

    `model_config` is the command's config.model (--config), or None. The config returned follows
    `echoclip_jax.model_config.resolve`: architecture from the config stored with the weights (which
    must agree with `model_config` when both exist), run settings (compute dtype, ...) from `model_config`.
    `orbax:W@STEP` reads one step of a training workdir.
    """
    kind, path = parse_spec(spec)
    stored, where = stored_config(kind, path, model_config)
    model_config = resolve_model_config(stored, model_config, where)
    params = READERS[kind](path, model_config)
    return model_config, {k: np.asarray(v) for k, v in params.items()}


def load_model(spec: str, model_config=None) -> CLIP:
    """KIND:PATH -> the model with those weights, in eval mode (config as `load` resolves it)."""
    model_config, params = load(spec, model_config)
    return make_model(model_config, params)


# ---------------------------------------------------------------- writers

def _write_safetensors(path: str, model_config, params: dict) -> None:
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({_flat_name(k): np.array(v, order="C") for k, v in params.items()}, path)
    with open(_json_path(path), "w") as f:
        json.dump({"model": model_config.to_dict()}, f, indent=2)


def _write_open_clip(path: str, model_config, params: dict) -> None:
    ocw.write_open_clip_dir(params, model_config, path)


def _write_params_only(path: str, model_config, params: dict) -> None:
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"{path}: already exists; choose a new directory for the params-only checkpoint")
    ocp.PyTreeCheckpointer().save(os.path.join(path, "params"), _nested(params))
    with open(os.path.join(path, PARAMS_CONFIG), "w") as f:
        json.dump({"model": model_config.to_dict()}, f, indent=2)


WRITERS = {"open_clip": _write_open_clip, "safetensors": _write_safetensors, "params": _write_params_only}


def save(spec: str, model_config, params: dict, dtype: str = "float32") -> None:
    """Writes `params` as KIND:PATH, floating-point weights cast to `dtype`."""
    kind, path = parse_spec(spec, DEST_KINDS)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cast = {k: np.asarray(v).astype(DTYPES[dtype]) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
            for k, v in params.items()}
    WRITERS[kind](path, model_config, cast)


# ---------------------------------------------------------------- verification

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
    for name, fa, fb, x in (("image", a.encode_image, b.encode_image, images),
                            ("text", a.encode_text, b.encode_text, tokens)):
        ea, eb = np.asarray(fa(x, normalize=False)), np.asarray(fb(x, normalize=False))
        out[name] = float(np.max(np.abs(ea - eb)) / max(float(np.max(np.abs(ea))), 1e-12))
    return out


def convert(src: str, dst: str, model_config=None, dtype: str = "float32") -> dict:
    """Converts src -> dst and returns the max relative embedding error of dst vs src (raises above the
    dtype's tolerance). Both are run in float32 (`model_config.for_verification`): the check compares
    weights, not compute precisions."""
    model_config, params = load(src, model_config)
    save(dst, model_config, params, dtype)
    _, dst_path = parse_spec(dst, DEST_KINDS)
    check = for_verification(model_config)
    _, written = load(dst, check)
    errors = compare_embeddings(make_model(check, params), make_model(check, written), check)
    tolerance = TOLERANCE[dtype]
    for name, err in errors.items():
        if not err <= tolerance:
            raise RuntimeError(f"{dst_path}: {name} embeddings differ from the source's by {err:.3g} (relative, "
                               f"float32 compute; tolerance {tolerance:g} for {dtype} weights)")
    return errors


FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config
    try:
        errors = convert(FLAGS.src, FLAGS.dst, config.model if config is not None else None, FLAGS.dtype)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {FLAGS.src} -> {FLAGS.dst}; verified: image embeddings max rel. error "
          f"{errors['image']:.2e}, text {errors['text']:.2e} (fixed input, source vs re-read destination)")
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("src", None, "KIND:PATH to read; KIND one of " + ", ".join(SOURCE_KINDS), required=True)
    flags.DEFINE_string("dst", None, "KIND:PATH to write; KIND one of " + ", ".join(DEST_KINDS), required=True)
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "dtype of the written floating-point weights")
    config_flags.DEFINE_config_file("config", None, "configs/*.py: the architecture when the source does not "
                                    "store one (else it must agree with it), and the run settings",
                                    lock_config=False)
    app.run(main)
