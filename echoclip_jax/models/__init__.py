"""Flax NNX CLIP models: ConvNeXt / ViT image towers, CLIP text tower, each parameter tagged with logical axes."""

from echoclip_jax.models.clip import CLIP, build_model, l2_normalize, preprocess_images

__all__ = ["CLIP", "build_model", "l2_normalize", "preprocess_images"]
