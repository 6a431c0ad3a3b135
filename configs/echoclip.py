"""EchoCLIP (Christensen et al., Nature Medicine 2024): the paper's recipe.

open_clip `convnext_base` (ConvNeXt-Base 224 + CLIP text transformer 512/8/12, embed 512, ~151.5M
parameters), CLIP BPE tokens, CLIP softmax loss, global batch 1024, warm-up 2000 steps to 5e-5, cosine
to 0 over 50 epochs, one random frame per video, initialised from LAION-400M CLIP.
"""

from echoclip_jax.config.defaults import get_base_config

PAPER_TRAIN_VIDEOS = 922_000  # about 1.03M videos before the patient split


def get_config():
    c = get_base_config()
    c.batch_size = 1024
    c.total_steps = 50 * PAPER_TRAIN_VIDEOS // c.batch_size  # 50 epochs
    c.checkpoint_every_steps = 2000
    c.eval_every_steps = 2000
    c.model.dtype = "bfloat16"
    c.init.kind = "open_clip"  # set --config.init.path to the LAION-400M convnext_base weights
    c.data.num_workers = 16
    c.sharding_preset = "fsdp"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
