"""One check of a whole config at start-up, before anything is compiled, read or written.

`validate(config)` checks each field's value and the fields against each other (the tokenizer against the
text tower, the batch against the devices and gradient accumulation, the loss against its parameters),
and raises one `ConfigError` listing every problem, each naming the field, its value and what would fit.
`train` and `aot` check the whole config (`training=True`, with the devices the run uses); the commands
that only run a model (evaluate, embed, interpret, search, report) check the model and tokenizer.
"""

from __future__ import annotations

import math

import jax

from echoclip_jax import tokenizers
from echoclip_jax.models.backend import DEPTHWISE_IMPLS
from echoclip_jax.models.convnext import CONVNEXT_VARIANTS
from echoclip_jax.models.vit import VIT_VARIANTS
from echoclip_jax.runtime import storage
from echoclip_jax.runtime.cli import UsageError

CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.temporal_pool": ("mean", "attention"),
    "model.vision.kind": ("convnext", "vit"),
    "model.vision.head": ("linear", "mlp"),
    "model.vision.depthwise_impl": DEPTHWISE_IMPLS,
    "model.text.pool": ("argmax", "eos"),
    "tokenizer.name": ("clip_bpe", "template", "sentencepiece"),
}
TRAIN_CHOICES = {
    "loss.name": ("clip", "siglip"),
    "loss.impl": ("plain", "allgather", "ring"),
    "optim.freeze": ("", "vision", "text"),
    "optim.nan_policy": ("stop", "skip"),
    "init.kind": ("random", "open_clip", "checkpoint"),
    "sharding_preset": ("dp", "fsdp", "fsdp_tp"),
    "data.on_corrupt_record": ("raise", "skip"),
}
POSITIVE = (
    "model.embed_dim",
    "model.vision.image_size",
    "model.text.vocab_size",
    "model.text.context_length",
    "model.text.width",
    "model.text.heads",
    "model.text.layers",
    "tokenizer.context_length",
)
TRAIN_POSITIVE = (
    "batch_size",
    "total_steps",
    "checkpoint_every_steps",
    "log_every_steps",
    "keep_checkpoints",
    "data.frames_per_sample",
    "optim.grad_accum_steps",
)
TRAIN_NON_NEGATIVE = (
    "eval_batches",
    "eval_every_steps",
    "data.num_workers",
    "optim.warmup_steps",
    "optim.weight_decay",
    "optim.grad_clip_norm",
    "loss.chunk_size",
)


class ConfigError(UsageError, ValueError):
    """A config that cannot run; the message lists every problem found (a command exits 2 with it)."""


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def validate(
    config,
    *,
    training: bool = True,
    num_devices: int | None = None,
    num_processes: int | None = None,
    tokenizer=None,
    compile_only: bool = False,
) -> None:
    """Raises ConfigError naming every field that cannot work; returns None when all can.

    `num_devices` / `num_processes`: what the run will use (default: jax's, when `training`). `tokenizer`:
    an already built one (default: built from config.tokenizer, as the commands do). `compile_only`: a
    compile for a pod (`aot`) reads neither the initial weights nor the tokenizer, so they are not checked."""
    problems: list[str] = []

    def bad(field, value, fits):
        problems.append(f"{field} = {value!r}: {fits}")

    choices = {**CHOICES, **(TRAIN_CHOICES if training else {})}
    for field, allowed in choices.items():
        value = _get(config, field)
        if value not in allowed:
            bad(field, value, f"expected one of {', '.join(repr(a) for a in allowed)}")
    for field in POSITIVE + (TRAIN_POSITIVE if training else ()):
        value = _get(config, field)
        if not isinstance(value, (int, float)) or value <= 0:
            bad(field, value, "must be a positive number")
    for field in TRAIN_NON_NEGATIVE if training else ():
        value = _get(config, field)
        if not isinstance(value, (int, float)) or value < 0:
            bad(field, value, "must be >= 0")
    if problems:  # the cross-field checks below assume sane single values
        raise ConfigError("config: " + "; ".join(problems))

    _model(config.model, bad)
    if not compile_only:
        _paths(config, training, bad)
    if not problems and not compile_only:
        _tokenizer(config, tokenizer, bad)
    if training:
        _training(config, num_devices, num_processes, bad, not compile_only)
    if problems:
        raise ConfigError("config: " + "; ".join(problems))


def _model(mc, bad) -> None:
    vc, tc = mc.vision, mc.text
    variants = CONVNEXT_VARIANTS if vc.kind == "convnext" else VIT_VARIANTS
    if vc.variant not in variants:
        bad("model.vision.variant", vc.variant, f"{vc.kind} variants are {', '.join(sorted(variants))}")
    elif vc.kind == "vit":
        patch = VIT_VARIANTS[vc.variant][3]
        if vc.image_size % patch:
            bad("model.vision.image_size", vc.image_size, f"must be a multiple of {vc.variant}'s patch size {patch}")
        if vc.head != "linear":
            bad("model.vision.head", vc.head, "the ViT tower has open_clip's linear projection only: 'linear'")
    if not 0 <= vc.drop_path_rate < 1:
        bad("model.vision.drop_path_rate", vc.drop_path_rate, "must be in [0, 1)")
    if not 0 <= tc.dropout < 1:
        bad("model.text.dropout", tc.dropout, "must be in [0, 1)")
    if tc.width % tc.heads:
        divisors = [h for h in range(1, tc.width + 1) if tc.width % h == 0 and h <= 64]
        bad("model.text.heads", tc.heads, f"must divide model.text.width {tc.width} (e.g. {divisors[-4:]})")
    if tc.pool == "eos" and not 0 <= tc.eos_id < tc.vocab_size:
        bad("model.text.eos_id", tc.eos_id, f"must be an id below model.text.vocab_size {tc.vocab_size}")


def _paths(config, training, bad) -> None:
    """Path fields (local paths or gs:// URLs): a supported scheme and, for a bucket, one that exists."""
    fields = ["tokenizer.path"]
    if training:
        fields += ["data_dir"] + (["init.path"] if config.init.kind != "random" else [])
    for field in fields:
        value = _get(config, field)
        if value:
            try:
                storage.check(value, f"--config.{field}")
            except storage.StorageError as e:
                bad(field, value, str(e).split(": ", 1)[1])


def _tokenizer(config, tokenizer, bad) -> None:
    tc, tok = config.model.text, config.tokenizer
    if tok.context_length != tc.context_length:
        bad(
            "tokenizer.context_length",
            tok.context_length,
            f"must equal model.text.context_length {tc.context_length} (the text tower's positions)",
        )
        return
    if tokenizer is None:
        if tok.name != "clip_bpe" and not tok.get("path"):
            bad(
                "tokenizer.path",
                tok.get("path", ""),
                f"the {tok.name} tokenizer needs its {'vocabulary' if tok.name == 'template' else 'model'} file",
            )
            return
        try:
            tokenizer = tokenizers.from_config(tok)
        except (OSError, ValueError) as e:
            bad("tokenizer.path", tok.get("path", ""), f"cannot be read ({e})")
            return
    if tokenizer.vocab_size > tc.vocab_size:
        bad(
            "model.text.vocab_size",
            tc.vocab_size,
            f"the {tok.name} tokenizer has {tokenizer.vocab_size} ids; "
            f"set model.text.vocab_size={tokenizer.vocab_size}",
        )
    if tc.pool == "eos" and tc.eos_id != tokenizer.eos_id:
        bad(
            "model.text.eos_id",
            tc.eos_id,
            f"the {tok.name} tokenizer ends texts with id {tokenizer.eos_id}; set model.text.eos_id={tokenizer.eos_id}",
        )
    if tc.pool == "argmax" and tokenizer.eos_id != tc.vocab_size - 1:
        bad(
            "model.text.pool",
            tc.pool,
            f"'argmax' pools the highest id, but the {tok.name} tokenizer's "
            f"end-of-text id is {tokenizer.eos_id} of {tc.vocab_size}; set model.text.pool=eos and "
            f"model.text.eos_id={tokenizer.eos_id}",
        )


def _training(config, num_devices, num_processes, bad, check_init) -> None:
    n = jax.device_count() if num_devices is None else num_devices
    procs = jax.process_count() if num_processes is None else num_processes
    b, accum = int(config.batch_size), int(config.optim.grad_accum_steps)
    sizes = [int(config.mesh[a]) for a in ("data", "fsdp", "tensor")]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes) or n % known or (-1 not in sizes and known != n):
        bad(
            "mesh",
            dict(zip(("data", "fsdp", "tensor"), sizes)),
            f"must use all {n} devices: sizes multiplying to {n}, one of them may be -1",
        )
        return
    sizes = [n // known if s == -1 else s for s in sizes]
    batch_devices = sizes[0] * sizes[1]  # the batch is split over data x fsdp
    if b % accum:
        bad("optim.grad_accum_steps", accum, f"must divide batch_size {b}")
        return
    micro = b // accum
    if micro % batch_devices:
        fit = math.lcm(batch_devices, accum)
        bad(
            "batch_size",
            b,
            f"each of the {accum} micro-batch(es) ({micro}) must split over the {batch_devices} "
            f"data x fsdp devices: use a multiple of {fit} (e.g. {-(-b // fit) * fit})",
        )
    if b % procs:
        bad("batch_size", b, f"must split over the {procs} processes")
    if config.loss.name == "siglip" and config.model.init_logit_bias is None:
        bad("model.init_logit_bias", None, "the siglip loss needs a logit bias (e.g. -10.0)")
    chunk = int(config.loss.chunk_size)  # chunks the shard_map losses' column blocks (plain ignores it)
    block = micro // batch_devices
    if chunk and config.loss.impl == "allgather" and chunk < micro and micro % chunk:
        bad("loss.chunk_size", chunk, f"must divide the gathered micro-batch {micro} (or be 0)")
    elif (
        chunk
        and config.loss.impl == "ring"
        and config.loss.name == "siglip"
        and micro % batch_devices == 0
        and chunk < block
        and block % chunk
    ):
        bad("loss.chunk_size", chunk, f"must divide each device's block of {block} (or be 0)")
    if check_init and config.init.kind != "random" and not config.init.path:
        bad(
            "init.path",
            "",
            f"init.kind {config.init.kind!r} needs the weights: set --config.init.path=PATH "
            f"(or --config.init.kind=random)",
        )
    if config.data.frames_per_sample > 1 and config.model.temporal_pool not in ("mean", "attention"):
        bad("model.temporal_pool", config.model.temporal_pool, "multi-frame samples need 'mean' or 'attention'")
