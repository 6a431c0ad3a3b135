"""Pre-LN transformer blocks in open_clip's layout (shared by the text tower and the ViT).

block(x) = x + attn(ln_1(x)) ; x + mlp(ln_2(x)), LayerNorm eps 1e-5, MLP 4x with exact GELU.
Attention weights are stored per head ([width, 3, heads, head_dim] for q/k/v, [heads, head_dim,
width] for the output) so the "heads" axis can be sharded for tensor parallelism.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from echoclip_jax.models import backend
from echoclip_jax.models.layers import DropPath, LayerNorm, Linear, gelu, param, project

LN_EPS = 1e-5


class Attention(nnx.Module):
    def __init__(self, width: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        hd = width // heads
        self.heads, self.dtype = heads, dtype
        std = width**-0.5
        self.qkv_kernel = param(
            rngs, nnx.initializers.normal(std), (width, 3, heads, hd), ("embed", None, "heads", "kv"), param_dtype
        )
        self.qkv_bias = param(rngs, nnx.initializers.zeros, (3, heads, hd), (None, "heads", "kv"), param_dtype)
        self.out_kernel = param(
            rngs, nnx.initializers.normal(std), (heads, hd, width), ("heads", "kv", "embed"), param_dtype
        )
        self.out_bias = param(rngs, nnx.initializers.zeros, (width,), ("embed",), param_dtype)

    def __call__(self, x, causal: bool):
        # Every product keeps the activations' (batch, tokens) rows in front, so each projection is one
        # plain matmul and XLA:CPU makes no transposed copies of the activations (a "bld,dthk->tblhk"
        # layout cost one per layer, forward and backward). q is scaled before the product, as in
        # PyTorch's attention. The parameters keep their per-head shapes (tensor-parallel "heads").
        dt = self.dtype
        qkv = project(x.astype(dt), self.qkv_kernel[...].astype(dt))  # [b, l, 3, heads, head_dim]
        qkv = qkv + self.qkv_bias[...].astype(dt)
        q, k, v = qkv[:, :, 0] * (qkv.shape[-1] ** -0.5), qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32)
        if causal:
            n = x.shape[1]
            mask = jnp.tril(jnp.ones((n, n), bool))
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
        return project(out, self.out_kernel[...].astype(dt), 2) + self.out_bias[...].astype(dt)


class ResidualBlock(nnx.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width, eps=LN_EPS, **kw)
        self.attn = Attention(width, heads, **kw)
        self.ln_2 = LayerNorm(width, eps=LN_EPS, **kw)
        self.c_fc = Linear(width, hidden, names=("embed", "mlp"), **kw)
        self.c_proj = Linear(hidden, width, names=("mlp", "embed"), **kw)
        # Element-wise dropout, then per-sample stochastic depth, on each residual branch.
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.drop_path = DropPath(drop_path, 3, rngs=rngs)

    def __call__(self, x, causal: bool = False):
        x = x + self.drop_path(self.dropout(self.attn(self.ln_1(x), causal)))
        return x + self.drop_path(self.dropout(self.c_proj(gelu(self.c_fc(self.ln_2(x))))))


class Transformer(nnx.Module):
    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        *,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        remat: bool = False,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        rates = [drop_path_rate * i / max(layers - 1, 1) for i in range(layers)]
        self.resblocks = nnx.List(
            [
                ResidualBlock(
                    width, heads, dropout=dropout, drop_path=rate, dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )
                for rate in rates
            ]
        )
        self.remat = remat

    def __call__(self, x, causal: bool = False):
        for block in self.resblocks:
            if self.remat:
                x = nnx.remat(lambda b, h: b(h, causal))(block, x)
            else:
                x = block(x, causal)
            x = backend.constrain_batch(x)  # each block keeps the batch split (FSDP gathers weights instead)
        return x
