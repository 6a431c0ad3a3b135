"""The one loader of model weights: `KIND:PATH[@STEP]` -> (model config, parameters).

Every command that reads weights (convert, evaluate, embed, interpret, search, report, and train's `init`)
goes through `load`, so a checkpoint means the same thing to all of them:

  open_clip:PATH    an open_clip directory (open_clip_config.json + weights, as
                    `open_clip.create_model_and_transforms("local-dir:DIR")` loads) or a bare state-dict file
                    (.safetensors/.bin/.pt), described by the open_clip_config.json beside it or by --config
  safetensors:PATH  our parameter names in one file, with `config.model` as JSON beside it (X.json)
  orbax:PATH[@STEP] a training workdir, its checkpoints directory or one step directory; `@STEP` picks one
                    step of a workdir (default: the latest); described by --config (no stored config)
  params:PATH       a params-only Orbax checkpoint (the parameter tree + echoclip_model.json)

Every PATH is a local path or a gs:// URL (`echoclip_jax.runtime.storage`): files that only a local reader
takes (safetensors, torch) are copied to a temporary file first; Orbax reads checkpoints on a bucket itself.

Which config describes the weights when both a stored config and --config exist is
`echoclip_jax.config.model.resolve`: architecture from the stored config (they must agree), run settings
(compute dtype, drop path, ...) from --config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import load_file

from echoclip_jax.config.model import resolve as resolve_model_config
from echoclip_jax.models import CLIP, build_model
from echoclip_jax.runtime import storage
from echoclip_jax.training.checkpoint import restore_params
from echoclip_jax.weights import open_clip as ocw

SOURCE_KINDS = ("open_clip", "safetensors", "orbax", "params")
PARAMS_CONFIG = "echoclip_model.json"  # beside the parameter tree of a params-only checkpoint
_OPEN_CLIP_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed `KIND:PATH[@STEP]`."""

    kind: str
    path: str
    step: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f"@{self.step}" if self.step is not None else "")


def parse(spec: str, kinds=SOURCE_KINDS) -> Spec:
    """ "orbax:W@200" -> Spec("orbax", "W", 200). `@STEP` is read only for orbax sources, and only when
    PATH@STEP is not itself an existing path."""
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in kinds:
        raise ValueError(
            f"{spec!r}: expected KIND:PATH with KIND one of {', '.join(kinds)}"
            + (" (orbax:PATH@STEP for one step of a training workdir)" if "orbax" in kinds else "")
        )
    m = re.fullmatch(r"(.+)@(\d+)", path)
    if m and not storage.exists(path):
        if kind != "orbax":
            raise ValueError(
                f"{spec!r}: @STEP selects a step of a training workdir (orbax:PATH@STEP); {kind} weights have no steps"
            )
        return Spec(kind, m.group(1), int(m.group(2)))
    return Spec(kind, path)


def check_spec(value: str, flag: str, kinds=SOURCE_KINDS) -> Spec:
    """Start-up check of a KIND:PATH flag, before any weights are read: a known KIND, and a PATH that is a
    local path or a gs:// URL whose bucket exists (`storage.check`). Raises ValueError naming `flag`."""
    kind, sep, path = value.partition(":")
    if sep and path and kind in kinds:
        storage.check(path, flag)
    try:
        return parse(value, kinds)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def expected_params(model_config) -> dict:
    """{param path: ShapeDtypeStruct} of the model `model_config` builds (no memory allocated)."""
    abstract = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def make_model(model_config, flat_params: dict) -> CLIP:
    """Builds the model and loads `flat_params` {path tuple: array} into it, in eval mode."""
    model = build_model(model_config, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.from_flat_state({k: jnp.asarray(v) for k, v in flat_params.items()}))
    model.eval()
    return model


def flat_name(path: tuple) -> str:
    """("vision", "stem", 0, "kernel") -> "vision/stem/0/kernel": a parameter's name in files."""
    return "/".join(str(p) for p in path)


def nested(flat: dict, *, string_keys: bool = False) -> dict:
    """{("a", 0, "b"): x} -> {"a": {0: {"b": x}}} (the tree `nnx.to_pure_dict` gives), or with every key a
    string (`string_keys`, the tree Orbax stores)."""
    tree: dict = {}
    for path, value in flat.items():
        keys = [str(k) for k in path] if string_keys else list(path)
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


# ---------------------------------------------------------------- stored configs


def isfile(path: str) -> bool:
    """A file (not a folder) at `path`, local or on a bucket."""
    return storage.path(path).is_file()


def _parent(path: str) -> str:
    return os.fspath(storage.path(path).parent)


def open_clip_files(path: str) -> tuple[str, str]:
    """(weights file, the open_clip_config.json that would describe it) of an open_clip source."""
    if storage.isdir(path):
        weights = [storage.join(path, f) for f in _OPEN_CLIP_WEIGHT_FILES if isfile(storage.join(path, f))]
        if not weights:
            raise FileNotFoundError(f"{path}: no open_clip weights ({', '.join(_OPEN_CLIP_WEIGHT_FILES)})")
        return weights[0], storage.join(path, "open_clip_config.json")
    return path, storage.join(_parent(path), "open_clip_config.json")


def _read_json(path: str) -> dict:
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _ours(path: str) -> ml_collections.ConfigDict:
    """The model config stored in one of our JSON files ({"model": config.model})."""
    stored = _read_json(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'model' config")
    return ml_collections.ConfigDict(stored["model"])


def safetensors_json(path: str) -> str:
    """X.safetensors -> X.json, where the model config of a safetensors file lives."""
    return os.path.splitext(path)[0] + ".json"


def stored_config(spec: Spec, given=None):
    """(the model config the weights carry, or None; the file it came from, or the spec's path)."""
    if spec.kind == "open_clip":
        _, config_path = open_clip_files(spec.path)
        if not isfile(config_path):
            return None, spec.path
        return ocw.model_config_from_open_clip(_read_json(config_path), base=given, source=config_path), config_path
    if spec.kind == "safetensors":
        config_path = safetensors_json(spec.path)
    else:  # orbax / params: a params-only checkpoint keeps its config beside the tree
        config_path = storage.join(spec.path, PARAMS_CONFIG)
    return (_ours(config_path), config_path) if isfile(config_path) else (None, spec.path)


# ---------------------------------------------------------------- readers: -> flat params


def _check_names(source: str, got: dict, expected: dict) -> None:
    """Raises naming `source` when the {name: shape} `got` lacks, adds or reshapes a parameter of `expected`."""
    names = {flat_name(k): k for k in expected}
    problems = [f"missing {n}" for n in names if n not in got]
    problems += [f"unexpected {n}" for n in got if n not in names]
    problems += [
        f"{n}: shape {tuple(got[n])}, the config needs {tuple(expected[k].shape)}"
        for n, k in names.items()
        if n in got and tuple(got[n]) != tuple(expected[k].shape)
    ]
    if problems:
        raise ValueError(f"{source}: does not match the model config: {'; '.join(problems[:12])}")


def _read_open_clip(spec: Spec, model_config) -> dict:
    weights, _ = open_clip_files(spec.path)
    return ocw.import_state_dict(
        ocw.read_state_dict(weights), expected_params(model_config), model_config, source=weights
    )


def _read_safetensors(spec: Spec, model_config) -> dict:
    if not isfile(spec.path):
        raise FileNotFoundError(f"{spec.path}: file not found")
    with storage.local_copy(spec.path) as local:
        try:
            tensors = load_file(local)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{spec.path}: not a readable safetensors file ({e})") from e
    expected = expected_params(model_config)
    _check_names(spec.path, {n: t.shape for n, t in tensors.items()}, expected)
    return {k: tensors[flat_name(k)].astype(s.dtype) for k, s in expected.items()}


def _read_params_only(spec: Spec, model_config) -> dict:
    expected = expected_params(model_config)
    item = nested({k: 0 for k in expected}, string_keys=True)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        tree = ocp.PyTreeCheckpointer().restore(
            storage.path(spec.path) / "params", args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
        )
    except Exception as e:  # Orbax raises many types for a tree that does not fit
        raise ValueError(f"{spec.path}: params-only checkpoint does not match the model config ({e})") from e
    flat = {}
    for k, s in expected.items():
        node = tree
        for key in k:
            node = node[str(key)]
        flat[k] = np.asarray(node).astype(s.dtype)
    return flat


def _read_checkpoint(spec: Spec, model_config) -> dict:
    if isfile(storage.join(spec.path, PARAMS_CONFIG)):
        if spec.step is not None:
            raise ValueError(f"{spec}: a params-only checkpoint has no steps; drop @{spec.step}")
        return _read_params_only(spec, model_config)

    leaves = {
        flat_name(tuple(getattr(p, "key", p) for p in kp)): v
        for kp, v in jax.tree_util.tree_flatten_with_path(restore_params(spec.path, step=spec.step))[0]
    }
    expected = expected_params(model_config)
    _check_names(spec.path, {n: np.shape(v) for n, v in leaves.items()}, expected)
    return {k: np.asarray(leaves[flat_name(k)]).astype(s.dtype) for k, s in expected.items()}


READERS = {
    "open_clip": _read_open_clip,
    "safetensors": _read_safetensors,
    "orbax": _read_checkpoint,
    "params": _read_checkpoint,
}


def load(spec: str | Spec, model_config=None) -> tuple[ml_collections.ConfigDict, dict]:
    """KIND:PATH[@STEP] -> (model config, flat params {path tuple: numpy array}).

    `model_config` is the command's config.model (--config), or None. The config returned follows
    `echoclip_jax.config.model.resolve`: architecture from the config stored with the weights (which
    must agree with `model_config` when both exist), run settings (compute dtype, ...) from `model_config`.
    """
    spec = parse(spec) if isinstance(spec, str) else spec
    stored, where = stored_config(spec, model_config)
    model_config = resolve_model_config(stored, model_config, where)
    params = READERS[spec.kind](spec, model_config)
    return model_config, {k: np.asarray(v) for k, v in params.items()}


def load_model(spec: str | Spec, model_config=None) -> CLIP:
    """KIND:PATH[@STEP] -> the model with those weights, in eval mode (config as `load` resolves it)."""
    model_config, params = load(spec, model_config)
    return make_model(model_config, params)
