"""Compile the real train step for a TPU pod slice on any machine, before renting the slice.

    python -m echoclip_jax.aot --config configs/echoclip.py --topology v5e-16 [--config.x=y ...] [--json R.json]

libtpu (the `tpu` extra: `pip install -e ".[tpu]"`) compiles for a TPU topology without a TPU
(`jax.experimental.topologies`). The step is `train.build_train_step`'s, over the config's mesh and
sharding preset laid on the topology's devices, lowered with abstract inputs: nothing is allocated. It
prints per-device memory (arguments, temporaries, outputs) against the chip's HBM with a verdict, FLOPs
per step, a predicted step time and from it samples/s, MFU and the time of the paper's recipe (50 epochs
of 1,032,975 videos, one frame per video per epoch), and what the compiled step does that it should not
(host transfers, large replicated state, float32 matmuls when bfloat16 was asked). Exit status 0: fits;
3: does not fit; 2: a usage error.

The predicted step time is XLA's own estimate (`cost_analysis()["optimal_seconds"]`) when the executable
reports a positive one; otherwise (the usual case for this step) a roofline of ours: max(FLOPs / the
chip's peak, bytes accessed / its HBM bandwidth), per device. It leaves out collectives, so it is a lower
bound on the step time and the MFU derived from it an upper bound.
"""
from __future__ import annotations

import json
import sys

from absl import flags

from echoclip_jax.runtime import logs
from echoclip_jax.training.pod_compile import TOPOLOGIES, compile_for_topology, format_report, log


def main(argv) -> None:
    del argv


    logs.setup()
    FLAGS = flags.FLAGS
    try:
        report = compile_for_topology(FLAGS.config, FLAGS.topology, FLAGS.hlo)
    except (ValueError, RuntimeError) as e:
        print(f"echoclip_jax.aot: {e}", file=sys.stderr)
        sys.exit(2)
    for line in format_report(report):
        log.info("%s", line)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=1)
    sys.exit(0 if report["fits"] else 3)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
    flags.DEFINE_string("topology", None, f"TPU slice to compile for: {', '.join(TOPOLOGIES)} (or gcloud's "
                        "v5litepod-N)")
    flags.DEFINE_string("json", "", "also write the report to this JSON file")
    flags.DEFINE_string("hlo", "", "also write the compiled step's optimized HLO to this file")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
