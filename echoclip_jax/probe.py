"""Probes on frozen embeddings: how much of a label a checkpoint's embeddings carry, beside a baseline.

  python -m echoclip_jax.probe --config configs/tiny.py --checkpoint safetensors:export/model.safetensors \
      --data_dir RECORDS --labels labels.csv --label view --label ef --key video_id --out P \
      [--train_split train --eval_split test] [--probe linear|attentive|both] [--frames K] \
      [--task ef=regression] [--batch_size B]

Newer echo foundation models (EchoJEPA, PanEcho) are judged this way rather than zero-shot: the encoder
stays frozen, a small probe is trained on one split's embeddings and scored on another's. Per label:
  linear     scikit-learn on the (standardised) video or study embedding: multinomial LogisticRegression
             (C) or Ridge (alpha), the strength chosen by cross-validation on the training split with
             folds grouped by patient (`cv_folds`), so no patient's videos are on both sides of a fold;
  attentive  a learned query over the frame embeddings of the video (key video_id) or of all the study's
             videos (key study_id), then a linear head (`echoclip_jax.probes.attentive`);
and, computed the same way on the same items, a baseline: the training split's majority class or mean.

Labels come from a CSV with a key column (`video_id` or `study_id`: the records' salted ids) and label
columns; `python -m echoclip_jax.probe_labels` writes one for the synthetic cohort. A label is a classification
(non-numeric, or at most MAX_CLASSES distinct integers) or a regression (other numbers), unless
`--task NAME=...` says which. Items without a label row, or with the label empty, are skipped and counted.
A study's embedding is the mean of its videos' embeddings, re-normalised; its label is the study's row.

Writes P/probe.json (per label and probe: metrics, baseline, n_train, n_eval, skipped counts, chosen
hyperparameters) and P/plots/ (confusion matrices, predicted vs true). Only aggregate numbers are written
or logged: no video, patient or study identifier leaves this module. --data_dir, --labels and --out are each a
local path or a gs:// URL.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax.probes.attentive import DEFAULTS as ATTENTIVE_DEFAULTS
from echoclip_jax.probes.labels import KEYS, TASKS
from echoclip_jax.probes.pipeline import PROBES, run
from echoclip_jax.runtime import cli, storage

FLAGS = cli.flag_values()
config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)", flag_values=FLAGS)
flags.DEFINE_string(
    "checkpoint", None, "weights, KIND:PATH[@STEP] (orbax, params, safetensors, open_clip)", flag_values=FLAGS
)
flags.DEFINE_string("data_dir", None, "records from data_prep.convert (local path or gs:// URL)", flag_values=FLAGS)
flags.DEFINE_string(
    "labels", None, "labels CSV: a key column and label columns (local path or gs:// URL)", flag_values=FLAGS
)
flags.DEFINE_multi_string("label", None, "a label column to probe (repeatable)", flag_values=FLAGS)
flags.DEFINE_enum("key", "video_id", KEYS, "what a labels row describes: a video or a study", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory (probe.json, plots/): local path or gs:// URL", flag_values=FLAGS)
flags.DEFINE_string("train_split", "train", "split the probes are trained on", flag_values=FLAGS)
flags.DEFINE_string("eval_split", "test", "split the probes are scored on", flag_values=FLAGS)
flags.DEFINE_enum("probe", "both", ("linear", "attentive", "both"), "which probes", flag_values=FLAGS)
flags.DEFINE_multi_string("task", None, "NAME=regression|classification: overrides detection", flag_values=FLAGS)
flags.DEFINE_integer(
    "frames", None, "at most this many evenly spaced frames per video (default: all)", flag_values=FLAGS
)
flags.DEFINE_integer("batch_size", 128, "frames per device batch when embedding", flag_values=FLAGS)
flags.DEFINE_integer(
    "epochs", None, f"attentive probe epochs (default {ATTENTIVE_DEFAULTS['epochs']})", flag_values=FLAGS
)
flags.DEFINE_integer("seed", 0, "attentive probe seed", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "checkpoint", "data_dir", "labels", "label", "out"], flag_values=FLAGS)


def _probe(f) -> None:
    tasks = {}
    for item in f.task or []:
        name, _, task = item.partition("=")
        if task not in TASKS:
            raise cli.UsageError(f"--task {item!r}: expected NAME=regression or NAME=classification")
        tasks[name] = task
    attentive = {"seed": f.seed, **({"epochs": f.epochs} if f.epochs else {})}
    run(
        f.config,
        f.checkpoint,
        f.data_dir,
        f.labels,
        labels=list(dict.fromkeys(f.label)),
        key=f.key,
        out_dir=f.out,
        train_split=f.train_split,
        eval_split=f.eval_split,
        probes=PROBES if f.probe == "both" else (f.probe,),
        tasks=tasks,
        frames=f.frames,
        batch_size=f.batch_size,
        attentive=attentive,
    )
    print(f"probe: wrote {storage.join(f.out, 'probe.json')}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        _probe, FLAGS, argv, name="probe", doc=__doc__, paths=("data_dir", "labels", "out"), specs=("checkpoint",)
    )


if __name__ == "__main__":
    sys.exit(main())
