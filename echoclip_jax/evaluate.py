"""Evaluate checkpoints: zero-shot tasks, retrieval, patient identification, clinical change; per video
and per study.

  python -m echoclip_jax.evaluate --config configs/tiny.py --workdir W --data_dir O --split test --out E
  python -m echoclip_jax.evaluate --config configs/echoclip.py --checkpoint open_clip:/path/model.bin ...
      [--level video|study|both] [--study_pool mean|weighted] [--study_temperature 0.01]

A sweep (`--workdir`, optionally `--steps 100,200`, or `--glob 'W/checkpoints/*'`) evaluates every
checkpoint that has no `E/<name>.json` yet (or one without a level asked for: that level is added to it),
so re-running after new checkpoints appear (or after an interruption) does only the new work. Per
checkpoint: `E/<name>.json` (name = training step, or the checkpoint's file name); after every run:
`E/summary.csv` (one row per JSON in E), TensorBoard scalars under `E/tensorboard`, and PNG plots under
`E/plots` (ROC curves, predicted vs true values, video vs study, metric vs step; `echoclip_jax.evaluation.outputs`).
Only aggregate numbers are written: no video, patient or study identifier leaves this module.

Levels (`--level`, default both). Video level (the paper): the JSON's top-level `tasks`, `retrieval`,
`patient_identification`, `clinical_change`, `num_videos`, ... Study level (EchoPrime, PanEcho: one
answer per study over all its views): the same structure under `study` (`study.tasks`, `study.retrieval`,
`study.patient_identification`, `study.num_studies`, ...), from `echoclip_jax.evaluation.study_level`: a study's
frames are its videos' frames end to end, its labels come from its report, its embedding is the
re-normalised mean of its videos' embeddings, and `--study_pool weighted` weights each view by its
zero-shot relevance to the task. The video-level figures do not depend on whether the study level runs.

Videos may differ in length (every real export does; `--frames K` keeps K evenly spaced frames of each
longer video, for speed): embeddings come from `echoclip_jax.inference.embedder` (jitted fixed-shape batches of
frames laid end to end, sharded over all local devices). Per-frame embeddings drive the zero-shot tasks,
each frame-wise rule applied per video over its own frames (the paper), or per study over its videos'
frames; video (study) embeddings drive retrieval and patient identification.
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax.config.validation import validate
from echoclip_jax.evaluation import study_level
from echoclip_jax.evaluation import zero_shot as zs
from echoclip_jax.evaluation.sweep import LEVELS, list_sources, run
from echoclip_jax.inference.embedder import Embedder, SplitEmbeddings, embed_split  # noqa: F401 (this module's API)
from echoclip_jax.runtime import logs

# ---------------------------------------------------------------------------------------- metrics


# ----------------------------------------------------------------------------------- checkpoints


# ------------------------------------------------------------------------------------------ driver


def _define_flags():

    config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)")
    flags.DEFINE_string("checkpoint", None, "one checkpoint, KIND:PATH (orbax, params, safetensors, open_clip)")
    flags.DEFINE_string("workdir", None, "training workdir: evaluate its checkpoints")
    flags.DEFINE_list("steps", None, "with --workdir: only these steps, e.g. 100,200")
    flags.DEFINE_multi_string("glob", None, "checkpoint directories matching this pattern (repeatable)")
    flags.DEFINE_string("data_dir", None, "records from data_prep.convert")
    flags.DEFINE_string("split", "test", "split to evaluate")
    flags.DEFINE_string("out", None, "output directory E")
    flags.DEFINE_list("tasks", None, "zero-shot tasks (names or aliases); default: every task in the table")
    flags.DEFINE_string("task_table", None, "zero-shot task table JSON (default echoclip_jax/config/zero_shot_tasks.json)")
    flags.DEFINE_integer("frames", None, "at most this many evenly spaced frames per video, for speed (default: "
                                         "every frame in the records; videos may differ in length)")
    flags.DEFINE_integer("batch_size", 128, "frames (or prompts) per device batch, over all devices")
    flags.DEFINE_string("calibration_split", None, "choose binary thresholds on this split (e.g. val) "
                                                   "instead of on the evaluated split")
    flags.DEFINE_enum("level", "both", list(LEVELS), "answer per video (the paper), per study (all its "
                                                     "videos; the JSON's `study` block) or both")
    flags.DEFINE_enum("study_pool", "mean", list(study_level.POOLS),
                      "study level: every frame of every video counts alike (mean), or each video weighted "
                      "by softmax of its zero-shot relevance to the task (weighted; see study_level)")
    flags.DEFINE_float("study_temperature", study_level.TEMPERATURE,
                       "softmax temperature of --study_pool weighted (smaller: closer to the best view alone)")
    return flags.FLAGS


def main(argv):
    del argv

    logs.setup()
    flags = FLAGS
    if flags.config is None or flags.data_dir is None or flags.out is None:
        sys.exit("evaluate: --config, --data_dir and --out are required")
    if not (flags.checkpoint or flags.workdir or flags.glob):
        sys.exit("evaluate: give --checkpoint KIND:PATH, --workdir W or --glob PATTERN")
    if flags.steps and not flags.workdir:
        sys.exit("evaluate: --steps needs --workdir")
    try:
        steps = [int(s) for s in flags.steps] if flags.steps else None
    except ValueError:
        sys.exit(f"evaluate: --steps must be integers, got {flags.steps}")
    try:
        validate(flags.config, training=False)
        tasks = zs.load_tasks(flags.task_table, flags.tasks)
        sources = list_sources(checkpoint=flags.checkpoint, workdir=flags.workdir, steps=steps,
                               globs=flags.glob)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate: {e}")
    try:
        done = run(flags.config, sources, data_dir=flags.data_dir, split=flags.split, out_dir=flags.out,
                   tasks=tasks, frames=flags.frames, batch_size=flags.batch_size,
                   calibration_split=flags.calibration_split, level=flags.level,
                   study_pool=flags.study_pool, study_temperature=flags.study_temperature)
    except (ValueError, FileNotFoundError, ImportError) as e:  # weights or records that cannot be used
        sys.exit(f"evaluate: {e}")
    print(f"evaluated {len(done)} checkpoint(s), skipped {len(sources) - len(done)}; "
          f"summary: {os.path.join(flags.out, 'summary.csv')}")


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
