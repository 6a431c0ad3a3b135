"""The dual encoder: image tower + text tower + learnable logit scale (and bias), video embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from echoclip_jax.models.convnext import ConvNeXt
from echoclip_jax.models.layers import LayerNorm, param
from echoclip_jax.models.text_transformer import TextTransformer
from echoclip_jax.models.vit import VisionTransformer

# OpenAI CLIP's pixel statistics (open_clip.constants.OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(x):
    """uint8 [..., H, W, 3] -> float32 normalised with CLIP's mean/std (jittable)."""
    x = jnp.asarray(x)
    if x.shape[-1] != 3:
        raise ValueError(f"images must be [..., H, W, 3] RGB, got shape {x.shape}")
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (x.astype(jnp.float32) / 255.0 - mean) / std


def l2_normalize(x, eps: float = 1e-12):
    """As torch.nn.functional.normalize: x / max(||x||, eps), computed in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def masked_mean(frames, mask=None):
    """Mean over axis 1 of frames [B, T, D], over the frames where `mask` [B, T] is true (all when None)."""
    if mask is None:
        return jnp.mean(frames, axis=1)
    m = mask.astype(frames.dtype)[..., None]
    return jnp.sum(frames * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)


class AttentionTemporalPool(nnx.Module):
    """Pools T frame embeddings with a learned query (multi-head), residual to their mean.

    The output projection starts at zero, so at initialisation the head *is* EchoCLIP's mean pooling and
    multi-frame training departs from it only as far as the loss asks.
    """

    def __init__(self, dim: int, heads: int = 8, *, param_dtype="float32", rngs: nnx.Rngs):
        if dim % heads:
            heads = 1
        self.heads = heads
        self.norm = LayerNorm(dim, eps=1e-5, name="joint", param_dtype=param_dtype, rngs=rngs)
        self.query = param(
            rngs, nnx.initializers.normal(dim**-0.5), (heads, dim // heads), ("heads", "kv"), param_dtype
        )
        self.key = param(
            rngs, nnx.initializers.normal(dim**-0.5), (dim, heads, dim // heads), ("joint", "heads", "kv"), param_dtype
        )
        self.value = param(
            rngs, nnx.initializers.normal(dim**-0.5), (dim, heads, dim // heads), ("joint", "heads", "kv"), param_dtype
        )
        self.out = param(
            rngs, nnx.initializers.zeros, (heads, dim // heads, dim), ("heads", "kv", "joint"), param_dtype
        )

    def __call__(self, frames, mask=None):
        """frames [B, T, D] (L2-normalised) -> [B, D] (not normalised). `mask` bool [B, T] marks the real
        frames of videos padded to T (videos of different lengths); padded frames take no part."""
        h = self.norm(frames)
        k = jnp.einsum("btd,dhk->bthk", h, self.key[...].astype(h.dtype))
        v = jnp.einsum("btd,dhk->bthk", h, self.value[...].astype(h.dtype))
        scores = jnp.einsum("hk,bthk->bht", self.query[...].astype(h.dtype), k) * (k.shape[-1] ** -0.5)
        scores = scores.astype(jnp.float32)
        if mask is not None:
            scores = jnp.where(mask[:, None, :], scores, -jnp.inf)
        attn = jax.nn.softmax(scores, axis=-1).astype(h.dtype)
        pooled = jnp.einsum("bht,bthk->bhk", attn, v)
        return masked_mean(frames, mask) + jnp.einsum("bhk,hkd->bd", pooled, self.out[...].astype(h.dtype))


class CLIP(nnx.Module):
    def __init__(
        self,
        visual: nnx.Module,
        text: TextTransformer,
        *,
        embed_dim: int,
        init_logit_scale: float,
        init_logit_bias: float | None = None,
        temporal_pool: str = "mean",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if temporal_pool not in ("mean", "attention"):
            raise ValueError(f"unknown temporal_pool {temporal_pool!r}; use 'mean' or 'attention'")
        self.visual = visual
        self.text = text
        self.embed_dim = embed_dim
        self.logit_scale = nnx.Param(jnp.asarray(init_logit_scale, param_dtype), out_sharding=(), eager_sharding=False)
        self.logit_bias = (
            None
            if init_logit_bias is None
            else nnx.Param(jnp.asarray(init_logit_bias, param_dtype), out_sharding=(), eager_sharding=False)
        )
        self.temporal_pool = (
            AttentionTemporalPool(embed_dim, param_dtype=param_dtype, rngs=rngs)
            if temporal_pool == "attention"
            else None
        )

    def encode_image(self, images, normalize: bool = True):
        """images float [B, H, W, 3] (see preprocess_images) -> [B, embed_dim] float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"encode_image wants [B, H, W, 3] float images, got shape {images.shape}")
        x = self.visual(images)
        return l2_normalize(x) if normalize else x.astype(jnp.float32)

    def encode_text(self, tokens, normalize: bool = True):
        """tokens int32 [B, L] -> [B, embed_dim] float32."""
        x = self.text(tokens)
        return l2_normalize(x) if normalize else x.astype(jnp.float32)

    def encode_video(self, videos):
        """videos float [B, T, H, W, 3] -> [B, embed_dim], L2-normalised.

        "mean": the mean of the L2-normalised frame embeddings, re-normalised (EchoCLIP);
        "attention": the learned temporal pooling head over the same frame embeddings.
        """
        if videos.ndim != 5:
            raise ValueError(f"encode_video wants [B, T, H, W, 3] float videos, got shape {videos.shape}")
        b, t = videos.shape[:2]
        return self.pool_frames(self.encode_image(videos.reshape((b * t,) + videos.shape[2:])).reshape(b, t, -1))

    def pool_frames(self, frames, mask=None):
        """L2-normalised frame embeddings [B, T, D] -> video embeddings [B, D], L2-normalised, by the model's
        temporal pool; `mask` bool [B, T] marks the real frames of videos padded to T."""
        if self.temporal_pool is None:
            return l2_normalize(masked_mean(frames, mask))
        return l2_normalize(self.temporal_pool(frames, mask))

    def __call__(self, images, tokens):
        """Returns (image_embeds, text_embeds), both L2-normalised; images [B,H,W,3] or videos [B,T,H,W,3]."""
        image_embeds = self.encode_video(images) if images.ndim == 5 else self.encode_image(images)
        return image_embeds, self.encode_text(tokens)


def build_model(model_config, *, rngs: nnx.Rngs) -> CLIP:
    """Builds the CLIP described by `config.model` (echoclip_jax/config/defaults.py)."""
    mc = model_config
    dt, pdt = mc.dtype, mc.param_dtype
    vc, tc = mc.vision, mc.text
    if vc.kind == "convnext":
        visual = ConvNeXt(
            vc.variant,
            mc.embed_dim,
            drop_path_rate=vc.drop_path_rate,
            head=vc.head,
            dw_impl=vc.get("depthwise_impl", "auto"),
            remat=mc.remat,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
    elif vc.kind == "vit":
        if vc.head != "linear":
            raise ValueError(f"the ViT tower has open_clip's linear projection only, got head {vc.head!r}")
        visual = VisionTransformer(
            vc.variant,
            mc.embed_dim,
            image_size=vc.image_size,
            drop_path_rate=vc.drop_path_rate,
            remat=mc.remat,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
    else:
        raise ValueError(f"unknown model.vision.kind {vc.kind!r}; use 'convnext' or 'vit'")
    text = TextTransformer(
        vocab_size=tc.vocab_size,
        context_length=tc.context_length,
        width=tc.width,
        heads=tc.heads,
        layers=tc.layers,
        embed_dim=mc.embed_dim,
        pool=tc.pool,
        eos_id=tc.eos_id,
        dropout=tc.dropout,
        remat=mc.remat,
        dtype=dt,
        param_dtype=pdt,
        rngs=rngs,
    )
    return CLIP(
        visual,
        text,
        embed_dim=mc.embed_dim,
        init_logit_scale=mc.init_logit_scale,
        init_logit_bias=mc.init_logit_bias,
        temporal_pool=mc.temporal_pool,
        param_dtype=pdt,
        rngs=rngs,
    )
