"""Train a CLIP on data_prep's TFRecords, on one CPU or a pod; resumes from the workdir when it holds a checkpoint.

  python -m echoclip_jax.train --config configs/tiny.py --workdir W [--config.total_steps=100 ...]

The workdir gets the checkpoints (train state and data position together), `metrics.jsonl` (one JSON line
per logged step) and TensorBoard events. Every field of the config file can be overridden as
`--config.field=value`. The work is done in `echoclip_jax.training.loop`, which reads top to bottom.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax.runtime import cli
from echoclip_jax.runtime.distributed import PeerLostError
from echoclip_jax.training.loop import train

FLAGS = cli.flag_values()
config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", flag_values=FLAGS)
flags.DEFINE_string(
    "workdir",
    None,
    "run directory (local path or gs:// URL, shared by all hosts of a pod): checkpoints, metrics.jsonl, "
    "TensorBoard; resumes from it",
    flag_values=FLAGS,
)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def _train(f) -> None:
    try:
        train(f.config, f.workdir)
    except PeerLostError as e:
        # exit now: at a normal exit jax.distributed's shutdown barrier would wait for the dead process until
        # the heartbeat timeout, then abort
        cli.say("train", str(e))
        os._exit(cli.FAILED)


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        _train, FLAGS, argv, name="train", doc=__doc__, failures=(*cli.FAILURES, FloatingPointError), paths=("workdir",)
    )


if __name__ == "__main__":
    sys.exit(main())
