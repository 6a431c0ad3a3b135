"""Vision Transformer image tower (open_clip `VisionTransformer` layout, class-token pooling).

patchify conv (no bias) -> [class token; patches] + positional embedding -> ln_pre -> transformer ->
ln_post -> class token -> projection.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from echoclip_jax.models import backend
from echoclip_jax.models.layers import Conv, LayerNorm, param
from echoclip_jax.models.transformer import LN_EPS, Transformer

# (width, layers, heads, patch size); "tiny" is DeiT-Ti's shape, B/32 and B/16 are open_clip's ViT-B-*.
VIT_VARIANTS = {
    "tiny": (192, 12, 3, 16),
    "B/32": (768, 12, 12, 32),
    "B/16": (768, 12, 12, 16),
}


class VisionTransformer(nnx.Module):
    """images float [B, H, W, 3] -> features [B, embed_dim] (not normalised)."""

    def __init__(
        self,
        variant: str,
        embed_dim: int,
        *,
        image_size: int = 224,
        drop_path_rate: float = 0.0,
        remat: bool = False,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if variant not in VIT_VARIANTS:
            raise ValueError(f"unknown ViT variant {variant!r}; choose from {sorted(VIT_VARIANTS)}")
        width, layers, heads, patch = VIT_VARIANTS[variant]
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n = (image_size // patch) ** 2
        self.conv1 = Conv(3, width, patch, patch, use_bias=False, **kw)
        scale = width**-0.5
        self.class_embedding = param(rngs, nnx.initializers.normal(scale), (width,), ("embed",), param_dtype)
        self.positional_embedding = param(
            rngs, nnx.initializers.normal(scale), (n + 1, width), (None, "embed"), param_dtype
        )
        self.ln_pre = LayerNorm(width, eps=LN_EPS, **kw)
        self.transformer = Transformer(width, layers, heads, drop_path_rate=drop_path_rate, remat=remat, **kw)
        self.ln_post = LayerNorm(width, eps=LN_EPS, **kw)
        self.proj = param(rngs, nnx.initializers.normal(scale), (width, embed_dim), ("embed", "joint"), param_dtype)

    def __call__(self, images):
        x = self.conv1(images)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(self.dtype)
        x = backend.constrain_batch(x)
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x[:, 0] @ self.proj[...].astype(self.dtype)
