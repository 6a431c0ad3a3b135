"""Defaults shared by every experiment; each config file overrides what differs.

Every field is overridable from the command line, e.g. `--config.batch_size=64`
or `--config.model.vision.drop_path_rate=0.0`.
"""

import math

import ml_collections

from echoclip_jax.config import model as model_config


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # --- top-level fields every job reads ---
    c.data_dir = ""  # output of data_prep.convert: {train,val,test}-*.tfrecord + .index
    c.batch_size = 1024  # global, across all processes and devices
    c.total_steps = 1000
    c.checkpoint_every_steps = 500
    c.seed = 0

    c.keep_checkpoints = 3  # most recent K kept (plus the best by eval metric)
    c.log_every_steps = 10
    c.eval_every_steps = 0  # 0 = only at the end
    c.eval_batches = 8

    # --- model (echoclip_jax.models; defaults and the architecture/run-setting split in echoclip_jax.config.model) ---
    c.model = model_config.defaults()

    # --- tokenizer (echoclip_jax.tokenizers.get_tokenizer) ---
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.name = "clip_bpe"  # clip_bpe | template | sentencepiece
    c.tokenizer.path = ""  # vocabulary (template) or model (sentencepiece) file
    c.tokenizer.context_length = 77

    # --- input pipeline (echoclip_jax.data) ---
    c.data = ml_collections.ConfigDict()
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.frames_per_sample = 1  # the paper: one random frame per video, new each epoch
    c.data.num_workers = 0  # grain mp_prefetch worker processes (0 = in-process)
    c.data.prefetch_buffer = 2
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.random_resized_crop = (0.9, 1.0)  # scale range; (1.0, 1.0) disables
    c.data.augment.brightness = 0.1
    c.data.augment.contrast = 0.1
    c.data.on_corrupt_record = "raise"  # "raise" or "skip"

    # --- loss (echoclip_jax.training.losses) ---
    c.loss = ml_collections.ConfigDict()
    c.loss.name = "clip"  # "clip" (softmax, EchoCLIP) or "siglip" (sigmoid)
    c.loss.impl = "plain"  # "plain" (GSPMD), "allgather" or "ring" (shard_map, no full logits on one device)
    c.loss.chunk_size = 0  # >0: chunk the logits in the shard_map implementations
    c.loss.max_logit_scale = math.log(100.0)  # clamp as open_clip does

    # --- optimiser (optax) ---
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-5
    c.optim.warmup_steps = 2000
    c.optim.end_lr_factor = 0.0  # cosine to 0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0  # 0 disables
    c.optim.grad_accum_steps = 1
    c.optim.freeze = ""  # "", "vision" or "text": keep one tower fixed
    c.optim.nan_policy = "stop"  # "stop" the run or "skip" the step on a non-finite loss

    # --- initialisation ---
    c.init = ml_collections.ConfigDict()
    c.init.kind = "random"  # random | open_clip | checkpoint
    c.init.path = ""  # open_clip state dict (.bin/.pt/.safetensors) or one of our checkpoints

    # --- mesh and sharding (echoclip_jax.runtime.sharding) ---
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.sharding_preset = "dp"  # dp | fsdp | fsdp_tp (sets the logical-axis rules)

    # --- multi-host ---
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port; empty = auto-detect (TPU pod, SLURM) or single process
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.initialization_timeout = 300
    # seconds without a peer's heartbeat before the survivors abort (a dead host must not hang the job)
    c.distributed.heartbeat_timeout = 100
    return c
