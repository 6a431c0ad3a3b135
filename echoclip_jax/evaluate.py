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

import dataclasses
import glob as globlib
import json
import os
import sys

import numpy as np

from echoclip_jax.evaluation import metrics, study_level
from echoclip_jax.evaluation import zero_shot as zs
from echoclip_jax.inference.embedder import Embedder, SplitEmbeddings, embed_split  # noqa: F401 (this module's API)
from echoclip_jax.evaluation.outputs import (
    PLOT_KEYS, flatten, level_panels, plot_checkpoint, plot_levels, plot_metrics_vs_step, read_results, write_json,
    write_summary, write_tensorboard,
)

LEVELS = {"video": ("video",), "study": ("study",), "both": ("video", "study")}
VIDEO_KEYS = ("num_videos", "num_frames", "frames_per_video", "tasks", "clinical_change", "retrieval",
              "patient_identification")  # the video level's keys of a result JSON (top level)


# ---------------------------------------------------------------------------------------- metrics


def _task_sims(embedder: Embedder, task: zs.Task, split: SplitEmbeddings) -> np.ndarray:
    """Similarities [M, P] of the split's frames (end to end, `split.lengths` per video) to the prompts."""
    texts, _ = zs.build_prompts(task)
    return zs.similarities(split.frames, embedder.texts(texts))


def compute_metrics(embedder: Embedder, split: SplitEmbeddings, tasks: list[zs.Task], *,
                    calibration: SplitEmbeddings | None = None, retrieval_chunk: int = 1024,
                    level: str = "both", study_pool: str = "mean",
                    study_temperature: float = study_level.TEMPERATURE) -> tuple[dict, dict]:
    """(results, curves): JSON-able metrics of one checkpoint, and arrays for its plots.

    `level` "video": today's keys (VIDEO_KEYS); "study": only `results["study"]` (curves["study"]);
    "both": both. Each task's similarities are computed once and serve both levels.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    video = "video" in LEVELS[level]
    study = (study_level.StudyMetrics(split, pool=study_pool, temperature=study_temperature,
                                      calibration=calibration) if "study" in LEVELS[level] else None)
    lengths = split.lengths
    results: dict = {}
    curves: dict = {}
    if video:
        results = {"num_videos": int(len(split.videos)), "num_frames": int(lengths.sum()),
                   "frames_per_video": {"min": int(lengths.min()), "max": int(lengths.max()),
                                        "mean": float(lengths.mean())},
                   "tasks": {}, "clinical_change": {}}
        curves = {"binary": {}, "regression": {}}
    for task in tasks:
        sims = _task_sims(embedder, task, split)
        c_sims = (_task_sims(embedder, task, calibration)
                  if calibration is not None and task.mode == "binary" else None)
        if study is not None:
            study.add_task(task, sims, c_sims)
        if not video:
            continue
        labels = zs.task_labels(task, split.report, {"ef": split.ef})
        calib = None
        if c_sims is not None:
            c_labels = zs.task_labels(task, calibration.report, {"ef": calibration.ef})
            known = np.isfinite(c_labels)
            if len(np.unique(c_labels[known])) == 2:
                calib = (c_labels[known].astype(int), zs.score_binary(c_sims, calibration.lengths)[known])
        out = zs.evaluate_task(task, sims, labels, lengths=lengths, calibration=calib)
        curve = out.pop("_curves", None)
        if curve is not None:
            curves["binary" if task.mode == "binary" else "regression"][task.name] = curve
        results["tasks"][task.name] = out
        if task.mode == "binary":
            results["clinical_change"][task.name] = metrics.clinical_change(
                split.videos, split.patient_id, split.study_id, split.study_day, np.nan_to_num(labels))
    if video:
        has_report = np.asarray([bool(r.strip()) for r in split.report])
        if has_report.sum() >= 2:
            report_embeds = embedder.texts([r for r, h in zip(split.report, has_report) if h])
            results["retrieval"] = metrics.retrieval_metrics(split.videos[has_report], report_embeds,
                                                             chunk_size=retrieval_chunk)
        pid = metrics.patient_identification(split.videos, split.patient_id, split.study_id)
        curves["patient_identification"] = {"labels": pid.pop("labels"), "scores": pid.pop("scores")}
        results["patient_identification"] = pid
    if study is not None:
        results["study"], curves["study"] = study.finish(embedder.texts, retrieval_chunk=retrieval_chunk)
    return results, curves


# ----------------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass
class Source:
    name: str  # the output file stem
    step: int | None
    spec: str  # what to load, as `echoclip_jax.weights.load` reads it: KIND:PATH[@STEP]


def list_sources(*, checkpoint: str | None = None, workdir: str | None = None,
                 steps: list[int] | None = None, globs: list[str] | None = None) -> list[Source]:
    """The checkpoints to evaluate, in step order, each with its output name."""
    from echoclip_jax.training import checkpoint as ckpt
    from echoclip_jax.weights import loader as weights

    sources = []
    if checkpoint:
        try:
            spec = weights.parse(checkpoint)
        except ValueError as e:
            raise ValueError(f"--checkpoint {e}") from None
        name = os.path.splitext(os.path.basename(os.path.normpath(spec.path)))[0]
        if spec.step is not None:
            name = f"{name}@{spec.step}"
        sources.append(Source(name=name, step=spec.step, spec=str(spec)))
    if workdir:
        available = ckpt.all_steps(workdir)
        if not available:
            raise FileNotFoundError(f"{workdir}: no checkpoints found")
        if steps:
            missing = sorted(set(steps) - set(available))
            if missing:
                raise ValueError(f"{workdir}: no checkpoint for step(s) {missing}; have {available}")
            available = [s for s in available if s in set(steps)]
        sources += [Source(name=str(s), step=s, spec=str(weights.Spec("orbax", workdir, s))) for s in available]
    for pattern in globs or ():
        matched = sorted(globlib.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"--glob {pattern!r} matches nothing")
        for path in matched:
            base = os.path.basename(os.path.normpath(path))
            step = int(base) if base.isdigit() else None
            sources.append(Source(name=base, step=step, spec=f"orbax:{path}"))
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two checkpoints would write the same result file(s): {dupes}")
    return sources


# ------------------------------------------------------------------------------------------ driver


def _missing_levels(path: str, levels: tuple[str, ...]) -> tuple[tuple[str, ...], dict]:
    """(levels of `levels` that the result at `path` lacks, that result or {}): video = "tasks" present,
    study = "study" present. A result from before levels existed is a complete video level."""
    if not os.path.exists(path):
        return levels, {}
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    have = {"video": "tasks" in old, "study": "study" in old}
    return tuple(lv for lv in levels if not have[lv]), old


def run(config, sources: list[Source], *, data_dir: str, split: str, out_dir: str,
        tasks: list[zs.Task], frames: int | None = None, batch_size: int = 128,
        calibration_split: str | None = None, level: str = "both", study_pool: str = "mean",
        study_temperature: float = study_level.TEMPERATURE, log=print) -> list[str]:
    """Evaluate every source whose result in out_dir lacks a level asked for (a result that has one
    level keeps it and gains the other); returns the names evaluated."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    os.makedirs(out_dir, exist_ok=True)
    todo = []
    for s in sources:
        path = os.path.join(out_dir, f"{s.name}.json")
        missing, old = _missing_levels(path, LEVELS[level])
        if missing:
            todo.append((s, missing, old))
        else:
            log(f"skip {s.name}: {path} exists")
    from echoclip_jax import tokenizers
    from echoclip_jax.weights import loader as weights

    image_size = config.model.vision.image_size
    for source, missing, old in todo:
        log(f"evaluate {source.name} ({source.spec}) on {data_dir} [{split}], level {'+'.join(missing)}")
        # weights and model config through weights.load's one rule (architecture: the stored config, which
        # must agree with --config; compute dtype and other run settings: --config)
        embedder = Embedder(weights.load_model(source.spec, config.model), tokenizers.from_config(config.tokenizer),
                            batch_size=batch_size)
        split_embeds = embed_split(embedder, data_dir, split, frames=frames, image_size=image_size)
        calibration = None
        if calibration_split:
            calibration = embed_split(embedder, data_dir, calibration_split, frames=frames,
                                      image_size=image_size)
        results, curves = compute_metrics(embedder, split_embeds, tasks, calibration=calibration,
                                          level="both" if len(missing) == 2 else missing[0],
                                          study_pool=study_pool, study_temperature=study_temperature)
        kept = {k: v for k, v in old.items() if k in (*VIDEO_KEYS, "study")}  # the level it already has
        record = {"name": source.name, "step": source.step, "checkpoint": source.spec, "split": split,
                  "calibration_split": calibration_split, **kept, **results}
        if "video" in missing:
            plot_checkpoint(out_dir, source.name, curves)
        if "study" in missing:
            plot_checkpoint(out_dir, source.name, curves["study"], level="study")
        plot_levels(out_dir, source.name, record)
        write_tensorboard(out_dir, source.name, source.step, results)
        write_json(os.path.join(out_dir, f"{source.name}.json"), record)
    write_summary(out_dir)
    plot_metrics_vs_step(out_dir)
    return [s.name for s, _, _ in todo]


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

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
    from echoclip_jax.runtime import logs

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
        from echoclip_jax.config.validation import validate
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
