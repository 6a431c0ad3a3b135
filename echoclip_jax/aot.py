"""Compile the real train step for a TPU pod slice on any machine, before renting the slice.

    python -m echoclip_jax.aot --config configs/echoclip.py --topology v5e-16 [--config.x=y ...] [--json R.json]

libtpu (the `tpu` extra: `pip install -e ".[tpu]"`) compiles for a TPU topology without a TPU. The step is
the one training runs (`echoclip_jax.training.step`), over the config's mesh and sharding preset laid on the
topology's devices, lowered with abstract inputs: nothing is allocated. It prints per-device memory
(arguments, temporaries, outputs) against the chip's HBM with a verdict, FLOPs per step, a predicted step
time and from it samples/s, MFU and the time of the paper's recipe (50 epochs of 1,032,975 videos, one
frame per video per epoch), and what the compiled step does that it should not (host transfers, large
replicated state, float32 matmuls when bfloat16 was asked); `echoclip_jax.training.pod_compile` says how.

Exit status: 0 fits; 3 does not fit; 2 a usage error (an unknown topology, a config that fails validation);
1 no libtpu, or the compiler failed for another reason than memory.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax.runtime import cli, storage
from echoclip_jax.training.pod_compile import TOPOLOGIES, compile_for_topology, format_report, get_topology

DOES_NOT_FIT = 3
log = logging.getLogger("echoclip_jax.aot")

FLAGS = cli.flag_values()
config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", flag_values=FLAGS)
flags.DEFINE_string(
    "topology", None, f"TPU slice to compile for: {', '.join(TOPOLOGIES)} (or gcloud's v5litepod-N)", flag_values=FLAGS
)
flags.DEFINE_string("json", "", "also write the report to this JSON file (local path or gs:// URL)", flag_values=FLAGS)
flags.DEFINE_string(
    "hlo", "", "also write the compiled step's optimized HLO to this file (local path or gs:// URL)", flag_values=FLAGS
)
flags.mark_flags_as_required(["config", "topology"], flag_values=FLAGS)


def _aot(f) -> int:
    try:
        get_topology(f.topology)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    report = compile_for_topology(f.config, f.topology, f.hlo)
    for line in format_report(report):
        log.info("%s", line)
    if f.json:
        storage.write_text(f.json, json.dumps(report, indent=1))
    return cli.OK if report["fits"] else DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        _aot, FLAGS, argv, name="aot", doc=__doc__, failures=(*cli.FAILURES, RuntimeError), paths=("json", "hlo")
    )


if __name__ == "__main__":
    sys.exit(main())
