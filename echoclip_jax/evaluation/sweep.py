"""Evaluating checkpoints: every checkpoint of a sweep, per video and per study, into one result JSON each.

`list_sources` names the checkpoints (one KIND:PATH, a training workdir's steps, or directories matching
patterns); `run` evaluates each source whose result lacks a level asked for (a result that has one level
keeps it and gains the other), so a rerun after new checkpoints appear, or after an interruption, does
only the new work; `compute_metrics` is one checkpoint's figures.

Video level (the paper): zero-shot tasks with each frame-wise rule applied per video over its own frames,
retrieval, patient identification, clinical change. Study level (EchoPrime, PanEcho: one answer per study
over all its views, `echoclip_jax.evaluation.study_level`): the same figures under the result's `study`
key. Embeddings come from `echoclip_jax.inference.embedder` (videos of any lengths in fixed-shape sharded
batches). Only aggregate numbers are written: no video, patient or study identifier leaves this module.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from echoclip_jax import tokenizers
from echoclip_jax.evaluation import metrics, study_level, task_table
from echoclip_jax.evaluation import zero_shot as zs
from echoclip_jax.evaluation.outputs import (
    plot_checkpoint,
    plot_levels,
    plot_metrics_vs_step,
    write_json,
    write_summary,
    write_tensorboard,
)
from echoclip_jax.inference.embedder import Embedder, SplitEmbeddings, embed_split
from echoclip_jax.runtime import storage
from echoclip_jax.training import checkpoint as ckpt
from echoclip_jax.weights import loader as weights

log = logging.getLogger(__name__)

LEVELS = {"video": ("video",), "study": ("study",), "both": ("video", "study")}
VIDEO_KEYS = (
    "num_videos",
    "num_frames",
    "frames_per_video",
    "tasks",
    "clinical_change",
    "retrieval",
    "patient_identification",
)  # the video level's keys of a result JSON (top level)


def _task_sims(embedder: Embedder, task: task_table.Task, split: SplitEmbeddings) -> np.ndarray:
    """Similarities [M, P] of the split's frames (end to end, `split.lengths` per video) to the prompts."""
    texts, _ = task_table.build_prompts(task)
    return zs.similarities(split.frames, embedder.texts(texts))


def compute_metrics(
    embedder: Embedder,
    split: SplitEmbeddings,
    tasks: list[task_table.Task],
    *,
    calibration: SplitEmbeddings | None = None,
    retrieval_chunk: int = 1024,
    level: str = "both",
    study_pool: str = "mean",
    study_temperature: float = study_level.TEMPERATURE,
) -> tuple[dict, dict]:
    """(results, curves): JSON-able metrics of one checkpoint, and arrays for its plots.

    `level` "video": today's keys (VIDEO_KEYS); "study": only `results["study"]` (curves["study"]);
    "both": both. Each task's similarities are computed once and serve both levels.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    video = "video" in LEVELS[level]
    study = (
        study_level.StudyMetrics(split, pool=study_pool, temperature=study_temperature, calibration=calibration)
        if "study" in LEVELS[level]
        else None
    )
    lengths = split.lengths
    results: dict = {}
    curves: dict = {}
    if video:
        results = {
            "num_videos": int(len(split.videos)),
            "num_frames": int(lengths.sum()),
            "frames_per_video": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean())},
            "tasks": {},
            "clinical_change": {},
        }
        curves = {"binary": {}, "regression": {}}
    for task in tasks:
        sims = _task_sims(embedder, task, split)
        c_sims = _task_sims(embedder, task, calibration) if calibration is not None and task.mode == "binary" else None
        if study is not None:
            study.add_task(task, sims, c_sims)
        if not video:
            continue
        labels = task_table.task_labels(task, split.report, {"ef": split.ef})
        calib = None
        if c_sims is not None:
            c_labels = task_table.task_labels(task, calibration.report, {"ef": calibration.ef})
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
                split.videos, split.patient_id, split.study_id, split.study_day, np.nan_to_num(labels)
            )
    if video:
        has_report = np.asarray([bool(r.strip()) for r in split.report])
        if has_report.sum() >= 2:
            report_embeds = embedder.texts([r for r, h in zip(split.report, has_report) if h])
            results["retrieval"] = metrics.retrieval_metrics(
                split.videos[has_report], report_embeds, chunk_size=retrieval_chunk
            )
        pid = metrics.patient_identification(split.videos, split.patient_id, split.study_id)
        curves["patient_identification"] = {"labels": pid.pop("labels"), "scores": pid.pop("scores")}
        results["patient_identification"] = pid
    if study is not None:
        results["study"], curves["study"] = study.finish(embedder.texts, retrieval_chunk=retrieval_chunk)
    return results, curves


@dataclasses.dataclass
class Source:
    name: str  # the output file stem
    step: int | None
    spec: str  # what to load, as `echoclip_jax.weights.loader.load` reads it: KIND:PATH[@STEP]


def list_sources(
    *,
    checkpoint: str | None = None,
    workdir: str | None = None,
    steps: list[int] | None = None,
    globs: list[str] | None = None,
) -> list[Source]:
    """The checkpoints to evaluate, in step order, each with its output name."""

    sources = []
    if checkpoint:
        try:
            spec = weights.parse(checkpoint)
        except ValueError as e:
            raise ValueError(f"--checkpoint {e}") from None
        name = storage.path(spec.path).stem
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
        matched = storage.match(pattern)
        if not matched:
            raise FileNotFoundError(f"--glob {pattern!r} matches nothing")
        for path in matched:
            base = storage.path(path).name
            step = int(base) if base.isdigit() else None
            sources.append(Source(name=base, step=step, spec=f"orbax:{path}"))
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two checkpoints would write the same result file(s): {dupes}")
    return sources


def _missing_levels(path: str, levels: tuple[str, ...]) -> tuple[tuple[str, ...], dict]:
    """(levels of `levels` that the result at `path` lacks, that result or {}): video = "tasks" present,
    study = "study" present. A result from before levels existed is a complete video level."""
    if not storage.exists(path):
        return levels, {}
    old = storage.load_json(path)
    have = {"video": "tasks" in old, "study": "study" in old}
    return tuple(lv for lv in levels if not have[lv]), old


def run(
    config,
    sources: list[Source],
    *,
    data_dir: str,
    split: str,
    out_dir: str,
    tasks: list[task_table.Task],
    frames: int | None = None,
    batch_size: int = 128,
    calibration_split: str | None = None,
    level: str = "both",
    study_pool: str = "mean",
    study_temperature: float = study_level.TEMPERATURE,
) -> list[str]:
    """Evaluate every source whose result in out_dir lacks a level asked for (a result that has one
    level keeps it and gains the other); returns the names evaluated."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    storage.makedirs(out_dir)
    todo = []
    for s in sources:
        path = storage.join(out_dir, f"{s.name}.json")
        missing, old = _missing_levels(path, LEVELS[level])
        if missing:
            todo.append((s, missing, old))
        else:
            log.info("skip %s: %s exists", s.name, path)

    image_size = config.model.vision.image_size
    for source, missing, old in todo:
        log.info("evaluate %s (%s) on %s [%s], level %s", source.name, source.spec, data_dir, split, "+".join(missing))
        # weights and model config through weights.load's one rule (architecture: the stored config, which
        # must agree with --config; compute dtype and other run settings: --config)
        embedder = Embedder(
            weights.load_model(source.spec, config.model),
            tokenizers.from_config(config.tokenizer),
            batch_size=batch_size,
        )
        split_embeds = embed_split(embedder, data_dir, split, frames=frames, image_size=image_size)
        calibration = None
        if calibration_split:
            calibration = embed_split(embedder, data_dir, calibration_split, frames=frames, image_size=image_size)
        results, curves = compute_metrics(
            embedder,
            split_embeds,
            tasks,
            calibration=calibration,
            level="both" if len(missing) == 2 else missing[0],
            study_pool=study_pool,
            study_temperature=study_temperature,
        )
        kept = {k: v for k, v in old.items() if k in (*VIDEO_KEYS, "study")}  # the level it already has
        record = {
            "name": source.name,
            "step": source.step,
            "checkpoint": source.spec,
            "split": split,
            "calibration_split": calibration_split,
            **kept,
            **results,
        }
        if "video" in missing:
            plot_checkpoint(out_dir, source.name, curves)
        if "study" in missing:
            plot_checkpoint(out_dir, source.name, curves["study"], level="study")
        plot_levels(out_dir, source.name, record)
        write_tensorboard(out_dir, source.name, source.step, results)
        write_json(storage.join(out_dir, f"{source.name}.json"), record)
    write_summary(out_dir)
    plot_metrics_vs_step(out_dir)
    return [s.name for s, _, _ in todo]


def watch(
    config,
    workdir: str,
    *,
    final_step: int,
    poll_s: float = 60.0,
    idle_timeout_s: float = 6 * 3600.0,
    **run_kwargs,
) -> list[str]:
    """Evaluates each checkpoint of a training `workdir` as it appears (the pod pattern: a small evaluation
    job beside the training job, both on the bucket), until the checkpoint of `final_step` (or a later one)
    is evaluated; returns the names evaluated. A step already evaluated (its result JSON in `out_dir`) is not
    evaluated again, so a restarted watcher picks up where it stopped. A step the training job's keep policy
    deleted before its turn is skipped with a warning. Raises TimeoutError when no new checkpoint has
    appeared for `idle_timeout_s` (the training job died or was stopped early)."""
    done, seen, idle_since = [], set(), time.monotonic()
    while True:
        steps = ckpt.all_steps(workdir)
        new = [s for s in steps if s not in seen]
        for step in new:
            source = Source(name=str(step), step=step, spec=str(weights.Spec("orbax", workdir, step)))
            try:
                done += run(config, [source], **run_kwargs)
            except (FileNotFoundError, ValueError):
                if step in ckpt.all_steps(workdir):
                    raise
                log.warning("step %d of %s was deleted (keep policy) before it could be evaluated", step, workdir)
            seen.add(step)
        if steps and steps[-1] >= final_step:
            log.info("evaluated the final step %d of %s", steps[-1], workdir)
            return done
        now = time.monotonic()
        if new:
            idle_since = now
        elif now - idle_since > idle_timeout_s:
            raise TimeoutError(
                f"{workdir}: no new checkpoint for {idle_timeout_s:.0f} s and step {final_step} (the final one) not "
                f"reached (last: {steps[-1] if steps else None}); is the training job still running?"
            )
        time.sleep(poll_s)
