"""Optimiser: AdamW with linear warm-up + cosine decay, global-norm clipping, a weight-decay mask,
optional freezing of one tower, gradient accumulation over micro-batches, and a traced switch that
skips a step (the non-finite-loss guard).

Parameters are plain pytrees (nested dicts from `nnx.to_pure_dict`); masks are decided by path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Top-level attribute names of the image tower (open_clip: `visual`); everything else except the
# logit scale/bias belongs to the text tower.
VISION_ROOTS = ("visual", "vision", "image_encoder", "vision_tower")
NO_DECAY_WORDS = ("norm", "bias", "embedding", "logit_")


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decays(path, leaf) -> bool:
    """Weight decay only on matrices and kernels: not on norms, biases, embeddings, logit scale/bias."""
    keys = [k.lower() for k in _keys(path)]
    if np.ndim(leaf) < 2 or keys[-1] == "scale":
        return False
    return not any(w in k or k.startswith("ln") for k in keys for w in NO_DECAY_WORDS)


def tower(path) -> str:
    """'vision', 'text' or 'logit' for a parameter path."""
    keys = _keys(path)
    if keys and keys[0] in VISION_ROOTS:
        return "vision"
    if keys and keys[0] in ("logit_scale", "logit_bias"):
        return "logit"
    return "text"


def make_schedule(optim_config, total_steps: int):
    """Linear warm-up from 0 to lr, then cosine to lr * end_lr_factor at total_steps (the paper: 2000
    steps to 5e-5, cosine to 0)."""
    lr, warmup = float(optim_config.lr), int(optim_config.warmup_steps)
    warmup = min(warmup, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=lr * float(optim_config.end_lr_factor),
    )


class AdamWState(NamedTuple):
    count: jax.Array  # steps applied so far
    mu: optax.Updates
    nu: optax.Updates


def adamw(schedule, *, b1: float, b2: float, eps: float, weight_decay: float) -> optax.GradientTransformationExtraArgs:
    """AdamW as torch.optim.AdamW and optax.adamw compute it (decoupled weight decay, on the parameters
    `decays` selects), with a traced switch: `tx.update(grads, state, params, apply=flag)`.

    With `apply` False the updates are zero and the state comes back unchanged, bit for bit, without a
    select over the state. The moments move by apply * (1 - b) * (g - m), PyTorch's lerp form, and a
    skipped step's gradient (maybe NaN) is replaced by zeros first. Not `where(apply, new, old)` over the
    parameters and moments: that select makes XLA copy every donated state buffer each step
    (BENCHMARKS.md).
    """

    def init(params):  # mu and nu are separate buffers: both are donated to the step
        return AdamWState(
            jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)
        )

    def update(grads, state, params=None, *, apply=True, **_):
        if params is None:
            raise ValueError("adamw needs the parameters (decoupled weight decay)")
        apply = jnp.asarray(apply, jnp.bool_)
        on = apply.astype(jnp.float32)
        t = (state.count + 1).astype(jnp.float32)  # a skipped step's bias correction is multiplied by 0
        c1, c2 = 1 - b1**t, 1 - b2**t
        lr = on * schedule(state.count)

        def leaf(path, g, m, v, p):
            g = jnp.where(apply, g, 0).astype(m.dtype)
            m = m + (on * (1 - b1)) * (g - m)
            v = v + (on * (1 - b2)) * (g * g - v)
            u = (m / c1) / (jnp.sqrt(v / c2) + eps)
            if weight_decay and decays(path, p):
                u = u + weight_decay * p
            return (-lr * u).astype(p.dtype), m, v

        flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
        rest = [treedef.flatten_up_to(x) for x in (state.mu, state.nu, params)]
        out = [leaf(path, g, *more) for (path, g), *more in zip(flat, *rest)]
        new = [treedef.unflatten([o[i] for o in out]) for i in range(3)]
        return new[0], AdamWState(state.count + apply.astype(jnp.int32), new[1], new[2])

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(optim_config, total_steps: int, params) -> tuple[optax.GradientTransformation, callable]:
    """(optax transform, schedule) for `params` (the pytree the transform will see). Its update takes
    `apply=flag` (default True): False leaves parameters and state unchanged."""
    schedule = make_schedule(optim_config, total_steps)
    parts = []
    if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
    parts.append(
        adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
        )
    )
    tx = optax.chain(*parts)
    freeze = optim_config.freeze
    if freeze:
        if freeze not in ("vision", "text"):
            raise ValueError(f"optim.freeze {freeze!r}: expected '', 'vision' or 'text'")
        labels = jax.tree.map_with_path(lambda p, _: "frozen" if tower(p) == freeze else "train", params)
        if "frozen" not in jax.tree.leaves(labels):
            raise ValueError(f"optim.freeze={freeze!r}: no parameter of that tower found (vision roots {VISION_ROOTS})")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def accumulate_gradients(loss_and_grad, params, batch: dict, steps: int):
    """Mean loss, aux and gradient over `steps` equal micro-batches of `batch` (a lax.scan, so memory is
    one micro-batch's activations). With a contrastive loss the negatives come from the micro-batch.
    """
    if steps <= 1:
        return loss_and_grad(params, batch)
    n = jax.tree.leaves(batch)[0].shape[0]
    if n % steps:
        raise ValueError(f"optim.grad_accum_steps={steps} must divide the batch size {n}")
    micro = jax.tree.map(lambda x: x.reshape(steps, n // steps, *x.shape[1:]), batch)

    def body(acc, mb):
        (loss, aux), grads = loss_and_grad(params, mb)
        return jax.tree.map(jnp.add, acc, ((loss, aux), grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(loss_and_grad, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / steps, total)
