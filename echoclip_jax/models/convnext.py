"""ConvNeXt image tower with timm's layout, plus open_clip's TimmModel projection head.

Matches `timm.create_model("convnext_<variant>")` as wrapped by open_clip (`timm_pool=""`): patchify
stem (4x4/4 conv + LayerNorm), 4 stages (stage>0 starts with LayerNorm + 2x2/2 conv), blocks of
depthwise 7x7 -> LayerNorm -> MLP(4x, GELU) -> layer scale -> drop path, then global average pool,
LayerNorm and open_clip's head ("linear": bias-free projection; "mlp": Linear-GELU-Linear(no bias)).
NHWC throughout. Stochastic depth rates increase linearly over all blocks, as timm's do.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from echoclip_jax.models import backend
from echoclip_jax.models.layers import Conv, DepthwiseConv, DropPath, LayerNorm, Linear, gelu, param

# (depths, dims) per timm variant
CONVNEXT_VARIANTS = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
# timm builds the smallest variants with 1x1-conv MLPs (same maths, [out, in, 1, 1] torch weights).
CONV_MLP_VARIANTS = ("atto", "femto", "pico", "nano")
LN_EPS = 1e-6
_INIT = nnx.initializers.truncated_normal(stddev=0.02)


class ConvNeXtBlock(nnx.Module):
    def __init__(self, dim: int, drop_path: float, *, ls_init: float, dw_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_dw = DepthwiseConv(dim, 7, impl=dw_impl, **kw)
        self.norm = LayerNorm(dim, eps=LN_EPS, **kw)
        self.fc1 = Linear(dim, 4 * dim, names=("embed", "mlp"), kernel_init=_INIT, **kw)
        self.fc2 = Linear(4 * dim, dim, names=("mlp", "embed"), kernel_init=_INIT, **kw)
        self.gamma = param(rngs, nnx.initializers.constant(ls_init), (dim,), ("embed",), param_dtype)
        self.drop_path = DropPath(drop_path, 4, rngs=rngs)

    def __call__(self, x):
        y = self.fc2(gelu(self.fc1(self.norm(self.conv_dw(x)))))
        return x + self.drop_path(y * self.gamma[...].astype(y.dtype))


class ConvNeXtStage(nnx.Module):
    def __init__(
        self, din: int, dout: int, depth: int, drop_paths, *, downsample: bool, remat: bool, block_kw, rngs: nnx.Rngs
    ):
        kw = dict(dtype=block_kw["dtype"], param_dtype=block_kw["param_dtype"], rngs=rngs)
        self.downsample_norm = LayerNorm(din, eps=LN_EPS, **kw) if downsample else None
        self.downsample_conv = Conv(din, dout, 2, 2, **kw) if downsample else None
        self.blocks = nnx.List([ConvNeXtBlock(dout, dp, rngs=rngs, **block_kw) for dp in drop_paths[:depth]])
        self.remat = remat

    def __call__(self, x):
        if self.downsample_conv is not None:
            x = self.downsample_conv(self.downsample_norm(x))
        for block in self.blocks:
            x = nnx.remat(lambda b, h: b(h))(block, x) if self.remat else block(x)
            x = backend.constrain_batch(x)  # each block keeps the batch split (FSDP gathers weights instead)
        return x


class ConvNeXt(nnx.Module):
    """images float [B, H, W, 3] -> features [B, embed_dim] (not normalised)."""

    def __init__(
        self,
        variant: str,
        embed_dim: int,
        *,
        drop_path_rate: float = 0.0,
        head: str = "linear",
        ls_init: float = 1e-6,
        dw_impl: str = "auto",
        remat: bool = False,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if variant not in CONVNEXT_VARIANTS:
            raise ValueError(f"unknown ConvNeXt variant {variant!r}; choose from {sorted(CONVNEXT_VARIANTS)}")
        if head not in ("linear", "mlp"):
            raise ValueError(f"unknown image head {head!r}; use 'linear' or 'mlp'")
        depths, dims = CONVNEXT_VARIANTS[variant]
        self.variant, self.head_kind, self.dtype = variant, head, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem_conv = Conv(3, dims[0], 4, 4, **kw)
        self.stem_norm = LayerNorm(dims[0], eps=LN_EPS, **kw)
        rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
        block_kw = dict(ls_init=ls_init, dw_impl=dw_impl, dtype=dtype, param_dtype=param_dtype)
        stages, start = [], 0
        for i, depth in enumerate(depths):
            din = dims[max(i - 1, 0)]
            stages.append(
                ConvNeXtStage(
                    din,
                    dims[i],
                    depth,
                    rates[start : start + depth],
                    downsample=i > 0,
                    remat=remat,
                    block_kw=block_kw,
                    rngs=rngs,
                )
            )
            start += depth
        self.stages = nnx.List(stages)
        self.head_norm = LayerNorm(dims[-1], eps=LN_EPS, **kw)
        if head == "linear":
            self.proj = Linear(dims[-1], embed_dim, names=("embed", "joint"), use_bias=False, **kw)
        else:
            self.mlp_fc1 = Linear(dims[-1], 2 * embed_dim, names=("embed", "mlp"), **kw)
            self.mlp_fc2 = Linear(2 * embed_dim, embed_dim, names=("mlp", "joint"), use_bias=False, **kw)

    def __call__(self, images):
        return self.forward_head(self.forward_features(images))

    def forward_features(self, images):
        """images [B, H, W, 3] -> the last stage's feature map [B, H/32, W/32, C] (PromptCAM's layer)."""
        x = backend.constrain_batch(self.stem_norm(self.stem_conv(images)))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_stages(self, images, upto: int):
        """images [B, H, W, 3] -> the feature map after stage `upto` (0-based; stride 4 * 2**upto), e.g. an
        earlier Grad-CAM layer that still resolves structure (the last stage is 2x2 at 64 px)."""
        if not 0 <= upto < len(self.stages):
            raise ValueError(f"stage {upto} outside 0..{len(self.stages) - 1}")
        x = backend.constrain_batch(self.stem_norm(self.stem_conv(images)))
        for stage in self.stages[: upto + 1]:
            x = stage(x)
        return x

    def forward_after(self, x, stage: int):
        """The feature map after stage `stage` -> the last stage's (forward_features' output); with
        forward_stages it splits forward_features at any stage."""
        for later in self.stages[stage + 1 :]:
            x = later(x)
        return x

    def forward_head(self, x):
        """Last-stage feature map -> embedding [B, embed_dim] (not normalised): pool, norm, projection."""
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        x = self.head_norm(x)
        if self.head_kind == "linear":
            return self.proj(x)
        return self.mlp_fc2(gelu(self.mlp_fc1(x)))
