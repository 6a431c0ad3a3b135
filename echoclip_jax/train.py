"""Train a CLIP on data_prep's TFRecords, on one CPU or a pod: `python -m echoclip_jax.train
--config configs/tiny.py --workdir W [--config.total_steps=100 ...]`. Resumes from W when it holds a
checkpoint.

Reads top to bottom: distributed init, mesh, input, model, shardings, update step, checkpoint,
evaluation, loop. The train state is a plain pytree {step, params, opt_state, rng, bad_step}; the
model is rebuilt from its graphdef inside the jitted step (nnx.merge), so jit shardings, Orbax and
weight conversion see plain nested dicts.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from echoclip_jax.config.validation import ConfigError
from echoclip_jax.runtime import logs
from echoclip_jax.runtime.distributed import PeerLostError
from echoclip_jax.training.loop import train


def main(argv) -> None:
    del argv


    logs.setup()
    FLAGS = flags.FLAGS
    try:
        train(FLAGS.config, FLAGS.workdir)
    except (FloatingPointError, ConfigError) as e:
        sys.exit(f"echoclip_jax.train: {e}")
    except PeerLostError as e:
        # exit now: at a normal exit jax.distributed's shutdown barrier would wait for the dead process until
        # the heartbeat timeout, then abort
        print(f"echoclip_jax.train: {e}", file=sys.stderr, flush=True)
        os._exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, TensorBoard; resumes from it")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
