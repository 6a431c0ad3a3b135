"""CLIP text tower (open_clip `CLIP.encode_text` layout).

token + positional embedding -> causal pre-LN transformer -> ln_final -> pool one token -> projection.
Pooling: "argmax" takes the position of the highest token id (CLIP BPE's end-of-text is the largest
id); "eos" takes the first position holding `eos_id` (EchoCLIP-R's template tokenizer, EOS 908).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from echoclip_jax.models import backend
from echoclip_jax.models.layers import LayerNorm, param
from echoclip_jax.models.transformer import LN_EPS, Transformer


class TextTransformer(nnx.Module):
    """tokens int32 [B, L] -> features [B, embed_dim] (not normalised)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        context_length: int,
        width: int,
        heads: int,
        layers: int,
        embed_dim: int,
        pool: str = "argmax",
        eos_id: int | None = None,
        dropout: float = 0.0,
        remat: bool = False,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if pool not in ("argmax", "eos"):
            raise ValueError(f"unknown text pool {pool!r}; use 'argmax' or 'eos'")
        if pool == "eos" and eos_id is None:
            raise ValueError("text pool 'eos' needs model.text.eos_id")
        self.pool, self.eos_id, self.dtype = pool, eos_id, dtype
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = param(
            rngs, nnx.initializers.normal(0.02), (vocab_size, width), ("vocab", "embed"), param_dtype
        )
        self.positional_embedding = param(
            rngs, nnx.initializers.normal(0.01), (context_length, width), (None, "embed"), param_dtype
        )
        self.transformer = Transformer(
            width, layers, heads, dropout=dropout, remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.ln_final = LayerNorm(width, eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = param(
            rngs, nnx.initializers.normal(width**-0.5), (width, embed_dim), ("embed", "joint"), param_dtype
        )

    def __call__(self, tokens):
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be [batch, {self.context_length}], got shape {tokens.shape}")
        x = jnp.take(self.token_embedding[...], tokens, axis=0).astype(self.dtype)
        x = backend.constrain_batch(x + self.positional_embedding[...].astype(self.dtype))
        x = self.ln_final(self.transformer(x, causal=True))
        if self.pool == "argmax":
            idx = jnp.argmax(tokens, axis=-1)
        else:
            idx = jnp.argmax(tokens == self.eos_id, axis=-1)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return pooled @ self.text_projection[...].astype(self.dtype)
