"""Contrastive losses over the global batch: CLIP softmax (what EchoCLIP used) and SigLIP sigmoid.

`plain` computes the full [N, N] logits and lets GSPMD place them. `allgather` and `ring` are
`jax.shard_map` implementations for large global batches that never hold the full logits on a device:
`allgather` gathers the (small) embeddings and computes this device's row block, optionally in column
chunks with an online log-sum-exp; `ring` passes embedding blocks round the devices with `ppermute`
and accumulates block by block. All three are the same function of the inputs, gradients included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from echoclip_jax.runtime.sharding import BATCH_AXES


def _scale(logit_scale, max_logit_scale):
    # open_clip clamps the log-space parameter to [0, ln 100]; the train step clamps the parameter
    # itself after each update, this keeps the loss safe for any caller.
    return jnp.exp(jnp.clip(logit_scale, 0.0, max_logit_scale))


# ------------------------------------------------------------------------------------------ plain


def clip_loss_plain(img, txt, logit_scale, logit_bias=None, *, max_logit_scale):
    del logit_bias
    logits = _scale(logit_scale, max_logit_scale) * img.astype(jnp.float32) @ txt.astype(jnp.float32).T
    i = jnp.arange(logits.shape[0])
    diag = logits[i, i]  # not jnp.diagonal: its platform-dependent cond would hold a sharded gather, which
    # XLA:CPU runs out of order with the step's other collectives (a deadlock)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (i2t.mean() + t2i.mean())


def siglip_loss_plain(img, txt, logit_scale, logit_bias, *, max_logit_scale):
    logits = _scale(logit_scale, max_logit_scale) * img.astype(jnp.float32) @ txt.astype(jnp.float32).T
    logits = logits + _bias(logit_bias)
    labels = 2.0 * jnp.eye(img.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / img.shape[0]


def _bias(logit_bias):
    if logit_bias is None:
        raise ValueError("the siglip loss needs a logit bias: set config.model.init_logit_bias (e.g. -10.0)")
    return logit_bias


# ------------------------------------------------------------------------------------ shard_map


def _lse_chunks(a, b, scale, chunk):
    """log-sum-exp over rows of scale * a @ b.T, computed `chunk` columns at a time (online max)."""
    n = b.shape[0]
    if not chunk or chunk >= n:
        return jax.nn.logsumexp(scale * a @ b.T, axis=1)
    if n % chunk:
        raise ValueError(f"loss.chunk_size {chunk} must divide the gathered batch {n}")
    blocks = b.reshape(n // chunk, chunk, b.shape[1])

    def body(carry, blk):
        m, s = carry
        x = scale * a @ blk.T
        m_new = jnp.maximum(m, x.max(axis=1))
        return (m_new, s * jnp.exp(m - m_new) + jnp.exp(x - m_new[:, None]).sum(axis=1)), None

    zero = jax.lax.stop_gradient(a[:, 0]) * 0.0  # shaped (and varying under shard_map) like the rows
    init = (zero - jnp.inf, zero)
    (m, s), _ = jax.lax.scan(body, init, blocks)
    return m + jnp.log(s)


def _siglip_block(a, b, scale, bias, positive: bool, chunk):
    """Sum of -log sigmoid(label * logit) over the block a @ b.T; labels +1 on the diagonal if positive."""

    def part(bb, offset):
        x = scale * a @ bb.T + bias
        labels = -jnp.ones_like(x)
        if positive:
            rows = jnp.arange(a.shape[0])[:, None]
            cols = offset + jnp.arange(bb.shape[0])[None, :]
            labels = jnp.where(rows == cols, 1.0, labels)
        return -jnp.sum(jax.nn.log_sigmoid(labels * x))

    n = b.shape[0]
    if not chunk or chunk >= n:
        return part(b, 0)
    if n % chunk:
        raise ValueError(f"loss.chunk_size {chunk} must divide the block {n}")
    blocks = b.reshape(n // chunk, chunk, b.shape[1])
    zero = jax.lax.stop_gradient(a[0, 0]) * 0.0  # varying under shard_map, as the scan carry must be
    total, _ = jax.lax.scan(
        lambda acc, xs: (acc + part(xs[0], xs[1] * chunk), None), zero, (blocks, jnp.arange(n // chunk))
    )
    return total


def _clip_allgather(img, txt, logit_scale, *, max_logit_scale, chunk, axes, n_global):
    scale = _scale(logit_scale, max_logit_scale)
    img_all = jax.lax.all_gather(img, axes, tiled=True)
    txt_all = jax.lax.all_gather(txt, axes, tiled=True)
    pos = scale * jnp.sum(img * txt, axis=1)
    local = (_lse_chunks(img, txt_all, scale, chunk) - pos).sum() + (
        _lse_chunks(txt, img_all, scale, chunk) - pos
    ).sum()
    return jax.lax.psum(local, axes) / (2 * n_global)


def _ring_shift(x, axes, n):
    return jax.lax.ppermute(x, axes, perm=[(i, (i - 1) % n) for i in range(n)])


def _clip_ring(img, txt, logit_scale, *, max_logit_scale, chunk, axes, n_global, n_dev):
    del chunk  # a ring block is already one device's share of the columns
    scale = _scale(logit_scale, max_logit_scale)
    pos = scale * jnp.sum(img * txt, axis=1)

    def body(carry, _):
        (m_r, s_r, m_c, s_c), (img_blk, txt_blk) = carry
        x_r = scale * img @ txt_blk.T  # my images vs a visiting text block
        x_c = scale * txt @ img_blk.T  # my texts vs a visiting image block
        m_r2, m_c2 = jnp.maximum(m_r, x_r.max(1)), jnp.maximum(m_c, x_c.max(1))
        s_r = s_r * jnp.exp(m_r - m_r2) + jnp.exp(x_r - m_r2[:, None]).sum(1)
        s_c = s_c * jnp.exp(m_c - m_c2) + jnp.exp(x_c - m_c2[:, None]).sum(1)
        nxt = (_ring_shift(img_blk, axes, n_dev), _ring_shift(txt_blk, axes, n_dev))
        return ((m_r2, s_r, m_c2, s_c), nxt), None

    zero = jax.lax.stop_gradient(pos) * 0.0  # varying under shard_map, as the scan carry must be
    neg = zero - jnp.inf
    init = ((neg, zero, neg, zero), (img, txt))
    ((m_r, s_r, m_c, s_c), _), _ = jax.lax.scan(body, init, None, length=n_dev)
    local = (m_r + jnp.log(s_r) - pos).sum() + (m_c + jnp.log(s_c) - pos).sum()
    return jax.lax.psum(local, axes) / (2 * n_global)


def _siglip_allgather(img, txt, logit_scale, logit_bias, *, max_logit_scale, chunk, axes, n_global):
    scale = _scale(logit_scale, max_logit_scale)
    txt_all = jax.lax.all_gather(txt, axes, tiled=True)
    x_pos = scale * jnp.sum(img * txt, axis=1) + logit_bias
    negatives = _siglip_block(img, txt_all, scale, logit_bias, False, chunk)
    # every pair was counted as a negative; swap the b true pairs to positives
    local = negatives + jnp.sum(jax.nn.log_sigmoid(-x_pos)) - jnp.sum(jax.nn.log_sigmoid(x_pos))
    return jax.lax.psum(local, axes) / n_global


def _siglip_ring(img, txt, logit_scale, logit_bias, *, max_logit_scale, chunk, axes, n_global, n_dev):
    scale = _scale(logit_scale, max_logit_scale)
    total = _siglip_block(img, txt, scale, logit_bias, True, chunk)

    def body(carry, _):
        acc, blk = carry
        blk = _ring_shift(blk, axes, n_dev)
        return (acc + _siglip_block(img, blk, scale, logit_bias, False, chunk), blk), None

    (total, _), _ = jax.lax.scan(body, (total, txt), None, length=n_dev - 1)
    return jax.lax.psum(total, axes) / n_global


# ----------------------------------------------------------------------------------------- entry


def make_loss_fn(loss_config, mesh=None):
    """loss(img_embeds, txt_embeds, logit_scale, logit_bias) -> scalar, per config.loss.

    img/txt are the L2-normalised global-batch embeddings, sharded over the batch axes of `mesh`.
    """
    name, impl = loss_config.name, loss_config.impl
    max_ls, chunk = float(loss_config.max_logit_scale), int(loss_config.chunk_size)
    if name not in ("clip", "siglip"):
        raise ValueError(f"loss.name {name!r}: expected 'clip' or 'siglip'")
    if impl == "plain":
        fn = clip_loss_plain if name == "clip" else siglip_loss_plain
        return functools.partial(fn, max_logit_scale=max_ls)
    if impl not in ("allgather", "ring"):
        raise ValueError(f"loss.impl {impl!r}: expected 'plain', 'allgather' or 'ring'")
    if mesh is None:
        raise ValueError(f"loss.impl {impl!r} needs the device mesh")
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    n_dev = 1
    for a in axes:
        n_dev *= mesh.shape[a]
    batch = P(axes, None)

    def loss(img, txt, logit_scale, logit_bias=None):
        kw = dict(max_logit_scale=max_ls, chunk=chunk, axes=axes, n_global=img.shape[0])
        if impl == "ring":
            kw["n_dev"] = n_dev
        if name == "clip":
            body = _clip_ring if impl == "ring" else _clip_allgather
            f = jax.shard_map(
                lambda i, t, s: body(i, t, s, **kw), mesh=mesh, in_specs=(batch, batch, P()), out_specs=P()
            )
            return f(img.astype(jnp.float32), txt.astype(jnp.float32), logit_scale)
        body = _siglip_ring if impl == "ring" else _siglip_allgather
        f = jax.shard_map(
            lambda i, t, s, b: body(i, t, s, b, **kw), mesh=mesh, in_specs=(batch, batch, P(), P()), out_specs=P()
        )
        return f(img.astype(jnp.float32), txt.astype(jnp.float32), logit_scale, _bias(logit_bias))

    return loss
