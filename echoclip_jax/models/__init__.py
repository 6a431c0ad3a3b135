"""Flax NNX CLIP models (contract B of the design): ConvNeXt / ViT image towers, CLIP text tower."""
from echoclip_jax.models.clip import CLIP, build_model, l2_normalize, preprocess_images

__all__ = ["CLIP", "build_model", "l2_normalize", "preprocess_images"]
