"""The saliency maps themselves: PromptCAM (Grad-CAM at a chosen ConvNeXt stage) and the input gradient
(optionally SmoothGrad), jitted and batched over frames for all prompts at once.

`echoclip_jax.interpret` writes these maps for videos and records; `echoclip_jax.saliency.scores` scores
them against the synthetic cohort's device masks. The score mapped is the cosine similarity between a
frame's image embedding and a prompt's text embedding.

PromptCAM's layer is a choice: EchoCLIP's method is the LAST stage (stride 32: a 2x2 grid at 64 px, 7x7
at 224 px, too coarse to point at a thin lead), and an earlier stage k (0-based, stride 4 * 2**k: at
64 px stage 0 is 16x16, 1 is 8x8, 2 is 4x4) resolves structure at the price of less class-specific
features. Either way the channel weights are the spatially averaged gradients of the score w.r.t. that
stage's feature map, the map is the ReLU of the weighted channel sum, bilinearly upsampled to the input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from echoclip_jax import models
from echoclip_jax.inference.sharded import ShardedModel

METHODS = ("promptcam", "gradient")
LAST = "last"
# The variants --score_truth compares (saliency_scores.parse_methods): EchoCLIP's PromptCAM, PromptCAM at
# stage 1 (8x8 at 64 px), the plain input gradient and SmoothGrad with 8 noisy copies.
DEFAULT_SCORE_METHODS = ("promptcam:last", "promptcam:1", "gradient", "smoothgrad:8")


def parse_stage(value, num_stages: int) -> int:
    """'last' or a stage number 0..num_stages-1 (as a str or int) -> the 0-based stage."""
    if str(value) == LAST:
        return num_stages - 1
    try:
        stage = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"cam stage {value!r}: expected 'last' or 0..{num_stages - 1}") from None
    if not 0 <= stage < num_stages:
        raise ValueError(f"cam stage {stage} outside 0..{num_stages - 1} (this tower has {num_stages} stages)")
    return stage


class SaliencyMapper:
    """Jitted, batched (over frames, sharded over devices) PromptCAM and input-gradient maps.

    `cam_stage` ('last' = EchoCLIP's PromptCAM, or 0..3) and `smoothgrad_samples` are the defaults of
    `maps`; each call may choose others (one compilation per variant, kept)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        image_size: int,
        batch_size: int = 16,
        smoothgrad_samples: int = 0,
        smoothgrad_sigma: float = 0.15,
        seed: int = 0,
        cam_stage="last",
    ):
        if smoothgrad_samples < 0 or smoothgrad_sigma < 0:
            raise ValueError("smoothgrad_samples and smoothgrad_sigma must be >= 0")
        if not hasattr(model.visual, "forward_stages"):
            raise ValueError(f"PromptCAM needs a ConvNeXt image tower; this model's is {type(model.visual).__name__}")
        self.num_stages = len(model.visual.stages)
        self.cam_stage = parse_stage(cam_stage, self.num_stages)
        self.sharded = ShardedModel(model, batch_size=batch_size)
        self.batch_size = self.sharded.batch_size
        self.image_size = int(image_size)
        self.tokenizer = tokenizer
        self.smoothgrad_samples = smoothgrad_samples
        self.smoothgrad_sigma = smoothgrad_sigma
        self._key = jax.random.key(seed)
        self._fns = {}
        self._texts = jax.jit(lambda state, tokens: self.sharded.module(state).encode_text(tokens, normalize=True))

    def cam_grid_size(self, stage=None) -> int:
        """Side of the CAM grid at `stage` before upsampling: image_size / (4 * 2**stage)."""
        stage = self.cam_stage if stage is None else parse_stage(stage, self.num_stages)
        return self.image_size // (4 * 2**stage)

    def _fn(self, method: str, stage: int, samples: int, grid: bool):
        key = (method, stage, samples, grid)
        if key not in self._fns:
            fn = (
                functools.partial(_promptcam, self.sharded, stage, grid)
                if method == "promptcam"
                else functools.partial(_gradient, self.sharded, samples, self.smoothgrad_sigma)
            )
            self._fns[key] = jax.jit(fn)
        return self._fns[key]

    def text_embeddings(self, prompts: list[str]):
        """L2-normalised text embeddings [P, D] of the prompts, replicated over the devices."""
        tokens = np.asarray(self.tokenizer.encode(list(prompts)), dtype=np.int32)
        return self.sharded.replicate(self._texts(self.sharded.state, tokens))

    def maps(
        self, method: str, frames: np.ndarray, text, *, cam_stage=None, smoothgrad_samples=None, grid: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 frames [K, S, S, 3], text embeddings [P, D] -> (maps [P, K, S, S], similarity [P, K]).

        cam_stage / smoothgrad_samples: this call's variant (None: the mapper's). grid (PromptCAM only):
        the CAM at its stage's own resolution [P, K, g, g], g = cam_grid_size, before upsampling."""

        if method not in METHODS:
            raise ValueError(f"unknown saliency method {method!r}; expected one of {METHODS}")
        if frames.ndim != 4 or not len(frames) or frames.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"frames must be [K, {self.image_size}, {self.image_size}, 3], got {frames.shape}")
        if grid and method != "promptcam":
            raise ValueError("grid=True is for PromptCAM only (gradient maps are at the input's resolution)")
        stage = self.cam_stage if cam_stage is None else parse_stage(cam_stage, self.num_stages)
        samples = self.smoothgrad_samples if smoothgrad_samples is None else int(smoothgrad_samples)
        if samples < 0:
            raise ValueError("smoothgrad_samples must be >= 0")

        def key():
            self._key, k = jax.random.split(self._key)
            return (k,)

        fn = self._fn(method, stage if method == "promptcam" else -1, samples if method == "gradient" else 0, grid)
        return self.sharded.map_batches(fn, frames, text, out_axis=1, per_batch=key if method == "gradient" else None)

    def maps_of_videos(
        self, method: str, videos: list[np.ndarray], text, **variant
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`maps` of several videos of any lengths at once: their frames are laid end to end, so batches are
        full across video boundaries (only the last one is padded), then split back per video."""
        if not videos:
            return []
        maps, scores = self.maps(method, np.concatenate(videos), text, **variant)
        cuts = np.cumsum([len(v) for v in videos])[:-1]
        return list(zip(np.split(maps, cuts, axis=1), np.split(scores, cuts, axis=1)))


def _per_prompt_vjp(fn, x, text):
    """Scores [B, P] of fn(x) and, for each prompt p, d sum_b score[b, p] / d x -> [P, *x.shape].

    Frames are independent in eval mode, so the gradient of the batch sum w.r.t. frame b is the gradient
    of frame b's own score."""

    scores, vjp = jax.vjp(fn, x)
    num_prompts = text.shape[0]
    onehots = jnp.broadcast_to(jnp.eye(num_prompts, dtype=scores.dtype)[:, None, :], (num_prompts, *scores.shape))
    (grads,) = jax.vmap(vjp)(onehots)
    return scores, grads


def _promptcam(sm, stage: int, grid: bool, state, frames, text):
    """Grad-CAM of every prompt's score at `stage`'s feature map -> (cam [P, B, S, S] or the grid, scores)."""

    visual = sm.module(state).visual
    feats = visual.forward_stages(models.preprocess_images(frames), stage)  # [B, h, w, C]

    def score(f):
        emb = visual.forward_head(visual.forward_after(f, stage))
        emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
        return emb @ text.T

    scores, grads = _per_prompt_vjp(score, feats, text)  # grads [P, B, h, w, C]
    weights = grads.mean(axis=(2, 3))  # [P, B, C]
    cam = jax.nn.relu(jnp.einsum("pbc,bhwc->pbhw", weights, feats.astype(weights.dtype)))
    if not grid:
        b, h, w = frames.shape[:3]
        cam = jax.image.resize(cam, (text.shape[0], b, h, w), method="bilinear")
    return cam.astype(jnp.float32), scores.T.astype(jnp.float32)


def _gradient(sm, samples: int, sigma: float, state, frames, text, key):
    """|d score / d pixel| (0..255 pixels, max over colour), averaged over `samples` noisy copies if > 0."""

    model = sm.module(state)

    def score(x):
        return model.encode_image(models.preprocess_images(x), normalize=True) @ text.T

    x = frames.astype(jnp.float32)
    scores, grads = _per_prompt_vjp(score, x, text)
    if samples:

        def noisy(total, k):
            noise = jax.random.normal(k, x.shape, x.dtype) * (sigma * 255.0)
            return total + _per_prompt_vjp(score, x + noise, text)[1], None

        grads, _ = jax.lax.scan(noisy, jnp.zeros_like(grads), jax.random.split(key, samples))
        grads = grads / samples
    return jnp.abs(grads).max(axis=-1), scores.T.astype(jnp.float32)
