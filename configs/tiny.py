"""A small CLIP that trains on a CPU in minutes: for the demo, tests and debugging.

ConvNeXt-atto-like image tower at 64x64 and a 4-layer, width-128 text transformer.
"""

from echoclip_jax.config.defaults import get_base_config


def get_config():
    c = get_base_config()
    c.batch_size = 32
    c.total_steps = 200
    c.checkpoint_every_steps = 100
    c.log_every_steps = 10
    c.eval_every_steps = 100
    c.eval_batches = 2
    c.model.embed_dim = 128
    c.model.vision.variant = "atto"
    c.model.vision.image_size = 64
    c.model.vision.drop_path_rate = 0.0
    c.model.text.width = 128
    c.model.text.heads = 4
    c.model.text.layers = 4
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.05
    c.data.augment.random_resized_crop = (1.0, 1.0)
    return c
