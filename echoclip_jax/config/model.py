"""Which model config describes a set of weights: the one rule every command that loads weights follows.

convert, evaluate, embed, interpret and train's `init` all load weights through `echoclip_jax.weights.loader.load`,
which calls `resolve` below, so the rule is the same everywhere:

- A checkpoint may carry a *stored* model config: `X.json` beside `X.safetensors`, `echoclip_model.json`
  in a params-only checkpoint, `open_clip_config.json` in an open_clip directory or beside its weights
  file. The command may have a *given* one: `--config`'s `config.model` (train: the run's config).
- The stored config describes the weights, so it decides the architecture: the fields in ARCHITECTURE
  (what sets a parameter's shape or presence, and the input size the weights were made for).
- Everything else in `config.model` is a run setting and comes from the given config, or from
  `defaults()` when there is none: compute `dtype`, `param_dtype`, `remat`,
  `vision.drop_path_rate`, `vision.depthwise_impl`, `text.dropout`, `init_logit_scale` and the value of
  `init_logit_bias`. A stored copy of a run setting is never used (the compute dtype is a choice of the
  run, not a property of the weights).
- When both exist and differ in an architecture field, loading fails with an error naming the stored
  file, the field, both values and the override that fixes it: neither config silently overrides the other.
- Training checkpoints (`orbax:`) and bare state-dict files carry no stored config: the given config
  describes them whole, and a missing one is an error.

Verification of a conversion is a comparison of weights, so it runs both models in float32 whatever the
run's compute dtype (`for_verification`).
"""

from __future__ import annotations

import math

import ml_collections

# Fields of config.model that describe the weights. `text.eos_id` counts too when `text.pool` is "eos"
# (it picks the pooled token), and `init_logit_bias` counts only as present or None (a `logit_bias`
# parameter exists or not); its value is a run setting (the trained value lives in the weights).
ARCHITECTURE = (
    "embed_dim",
    "temporal_pool",
    "vision.kind",
    "vision.variant",
    "vision.image_size",
    "vision.head",
    "text.vocab_size",
    "text.context_length",
    "text.width",
    "text.heads",
    "text.layers",
    "text.pool",
)


def _get(mc, field: str):
    node = mc
    for part in field.split("."):
        node = node[part]
    return node


def _set(d: dict, field: str, value) -> None:
    *parents, leaf = field.split(".")
    for part in parents:
        d = d[part]
    d[leaf] = value


def architecture(mc) -> dict:
    """{field: value} of the architecture fields of a `config.model` (see the module docstring)."""
    arch = {f: _get(mc, f) for f in ARCHITECTURE}
    if arch["text.pool"] == "eos":
        arch["text.eos_id"] = mc.text.eos_id
    arch["init_logit_bias"] = "a number (logit_bias parameter)" if mc.get("init_logit_bias") is not None else None
    return arch


def defaults() -> ml_collections.ConfigDict:
    """`config.model`'s defaults (echoclip_jax/config/defaults.py starts from these): the paper's convnext_base CLIP."""
    m = ml_collections.ConfigDict()
    m.embed_dim = 512
    m.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    m.param_dtype = "float32"  # master weights
    m.remat = False  # rematerialise each block (saves activation memory)
    m.init_logit_scale = math.log(1 / 0.07)
    m.init_logit_bias = None  # e.g. -10.0 for the sigmoid (SigLIP) loss
    m.temporal_pool = "mean"  # "mean" (EchoCLIP) or "attention" for multi-frame training

    m.vision = ml_collections.ConfigDict()
    m.vision.kind = "convnext"  # "convnext" or "vit"
    m.vision.variant = "base"  # convnext: atto femto pico nano tiny small base large; vit: tiny B/32 B/16
    m.vision.image_size = 224
    m.vision.drop_path_rate = 0.1
    m.vision.head = "linear"  # "linear" or "mlp"
    m.vision.depthwise_impl = (
        "auto"  # ConvNeXt depthwise conv: auto | shifted | matmul | lax (lax compiles faster on CPU)
    )

    m.text = ml_collections.ConfigDict()
    m.text.vocab_size = 49408
    m.text.context_length = 77
    m.text.width = 512
    m.text.heads = 8
    m.text.layers = 12
    m.text.dropout = 0.0
    m.text.pool = "argmax"  # "argmax" (CLIP BPE: EOT has the highest id) or "eos" (template: EOS id)
    m.text.eos_id = 49407
    return m


def resolve(stored, given, where: str) -> ml_collections.ConfigDict:
    """The model config to build for weights whose stored config is `stored` (or None), loaded by a
    command whose --config gives `given` (config.model, or None). `where` names the stored config file
    (or the weights, when nothing is stored) in errors. Returns a new ConfigDict; inputs are not changed."""
    if stored is None and given is None:
        raise ValueError(f"{where}: carries no model config; pass --config naming the architecture")
    out = (given if given is not None else defaults()).to_dict()
    if stored is None:
        return ml_collections.ConfigDict(out)
    want = architecture(stored)
    if given is not None:
        have = architecture(given)
        for field, value in want.items():
            if have.get(field) != value:
                fix = (
                    f"--config.model.{field}={value}"
                    if field != "init_logit_bias"
                    else "--config.model.init_logit_bias=" + ("-10.0 (any number)" if value is not None else "None")
                )
                raise ValueError(
                    f"{where}: the stored model config has model.{field} = {value!r}, --config has "
                    f"{have.get(field)!r}. The stored config describes these weights: pass {fix} or a config "
                    f"file that matches (architecture fields: {', '.join(ARCHITECTURE)}, text.eos_id with "
                    f"pool 'eos', init_logit_bias None or not)"
                )
        return ml_collections.ConfigDict(out)
    for field in ARCHITECTURE:
        _set(out, field, _get(stored, field))
    if stored.text.pool == "eos":
        out["text"]["eos_id"] = stored.text.eos_id
    out["init_logit_bias"] = stored.get("init_logit_bias")
    return ml_collections.ConfigDict(out)


def for_verification(mc) -> ml_collections.ConfigDict:
    """`mc` computing in float32 with float32 parameters: what a weights comparison runs in."""
    out = mc.to_dict()
    out["dtype"] = "float32"
    out["param_dtype"] = "float32"
    return ml_collections.ConfigDict(out)
