"""Evaluate checkpoints: zero-shot tasks, retrieval, patient identification, clinical change; per video
and per study.

  python -m echoclip_jax.evaluate --config configs/tiny.py --workdir W --data_dir O --split test --out E
  python -m echoclip_jax.evaluate --config configs/echoclip.py --checkpoint open_clip:/path/model.bin ...
      [--level video|study|both] [--study_pool mean|weighted] [--study_temperature 0.01]

  python -m echoclip_jax.evaluate --config configs/echoclip.py --workdir gs://b/run --watch --data_dir ... --out gs://b/eval

Every path may be a local path or a gs:// URL. `--watch` evaluates each checkpoint of `--workdir` as the
training job writes it (run it beside the training job, with the same --config and overrides: it stops
after the checkpoint of config.total_steps). A sweep (`--workdir`, optionally `--steps 100,200`, or
`--glob 'W/checkpoints/*'`) evaluates every
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

import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax.config.validation import validate
from echoclip_jax.evaluation import study_level, task_table
from echoclip_jax.evaluation.sweep import LEVELS, list_sources, run, watch
from echoclip_jax.runtime import cli, storage

FLAGS = cli.flag_values()
config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)", flag_values=FLAGS)
flags.DEFINE_string(
    "checkpoint", None, "one checkpoint, KIND:PATH (orbax, params, safetensors, open_clip)", flag_values=FLAGS
)
flags.DEFINE_string("workdir", None, "training workdir: evaluate its checkpoints", flag_values=FLAGS)
flags.DEFINE_list("steps", None, "with --workdir: only these steps, e.g. 100,200", flag_values=FLAGS)
flags.DEFINE_multi_string("glob", None, "checkpoint directories matching this pattern (repeatable)", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "records from data_prep.convert (local path or gs:// URL)", flag_values=FLAGS)
flags.DEFINE_string("split", "test", "split to evaluate", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory E (local path or gs:// URL)", flag_values=FLAGS)
flags.DEFINE_list(
    "tasks", None, "zero-shot tasks (names or aliases); default: every task in the table", flag_values=FLAGS
)
flags.DEFINE_string(
    "task_table",
    None,
    "zero-shot task table JSON (default: the paper's 16 tasks, echoclip_jax/config/zero_shot_tasks.json)",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "frames",
    None,
    "at most this many evenly spaced frames per video, for speed (default: "
    "every frame in the records; videos may differ in length)",
    flag_values=FLAGS,
)
flags.DEFINE_integer("batch_size", 128, "frames (or prompts) per device batch, over all devices", flag_values=FLAGS)
flags.DEFINE_string(
    "calibration_split",
    None,
    "choose binary thresholds on this split (e.g. val) instead of on the evaluated split",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "level",
    "both",
    list(LEVELS),
    "answer per video (the paper), per study (all its videos; the JSON's `study` block) or both",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "study_pool",
    "mean",
    list(study_level.POOLS),
    "study level: every frame of every video counts alike (mean), or each video weighted by softmax "
    "of its zero-shot relevance to the task (weighted; see study_level)",
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "study_temperature",
    study_level.TEMPERATURE,
    "softmax temperature of --study_pool weighted (smaller: closer to the best view alone)",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "watch",
    False,
    "with --workdir: evaluate each checkpoint as training writes it, until the checkpoint of the config's total_steps",
    flag_values=FLAGS,
)
flags.DEFINE_float("watch_poll_s", 60.0, "--watch: seconds between looks for new checkpoints", flag_values=FLAGS)
flags.DEFINE_float(
    "watch_timeout_s",
    6 * 3600.0,
    "--watch: give up (exit 1) when no new checkpoint appears for this long",
    flag_values=FLAGS,
)
flags.mark_flags_as_required(["config", "data_dir", "out"], flag_values=FLAGS)


def _evaluate(f) -> None:
    if not (f.checkpoint or f.workdir or f.glob):
        raise cli.UsageError("give --checkpoint KIND:PATH, --workdir W or --glob PATTERN")
    if f.steps and not f.workdir:
        raise cli.UsageError("--steps needs --workdir")
    if f.watch and (not f.workdir or f.checkpoint or f.glob or f.steps):
        raise cli.UsageError(
            "--watch follows one training run: give --workdir alone (no --checkpoint, --glob, --steps)"
        )
    try:
        steps = [int(s) for s in f.steps] if f.steps else None
    except ValueError:
        raise cli.UsageError(f"--steps must be integers, got {f.steps}") from None
    validate(f.config, training=False)
    tasks = task_table.load_tasks(f.task_table, f.tasks)
    common = dict(
        data_dir=f.data_dir,
        split=f.split,
        out_dir=f.out,
        tasks=tasks,
        frames=f.frames,
        batch_size=f.batch_size,
        calibration_split=f.calibration_split,
        level=f.level,
        study_pool=f.study_pool,
        study_temperature=f.study_temperature,
    )
    if f.watch:
        done = watch(
            f.config,
            f.workdir,
            final_step=int(f.config.total_steps),
            poll_s=f.watch_poll_s,
            idle_timeout_s=f.watch_timeout_s,
            **common,
        )
        print(f"evaluated {len(done)} checkpoint(s) as they appeared; summary: {storage.join(f.out, 'summary.csv')}")
        return
    sources = list_sources(checkpoint=f.checkpoint, workdir=f.workdir, steps=steps, globs=f.glob)
    done = run(f.config, sources, **common)
    print(
        f"evaluated {len(done)} checkpoint(s), skipped {len(sources) - len(done)}; "
        f"summary: {storage.join(f.out, 'summary.csv')}"
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        _evaluate,
        FLAGS,
        argv,
        name="evaluate",
        doc=__doc__,
        paths=("workdir", "glob", "data_dir", "out", "task_table"),
        specs=("checkpoint",),
    )


if __name__ == "__main__":
    sys.exit(main())
