"""Evaluate checkpoints: zero-shot tasks, retrieval, patient identification, clinical change.

  python -m echoclip_jax.evaluate --config configs/tiny.py --workdir W --data_dir O --split test --out E
  python -m echoclip_jax.evaluate --config configs/echoclip.py --checkpoint open_clip:/path/model.bin ...

A sweep (`--workdir`, optionally `--steps 100,200`, or `--glob 'W/checkpoints/*'`) evaluates every
checkpoint that has no `E/<name>.json` yet, so re-running after new checkpoints appear (or after an
interruption) does only the new work. Per checkpoint: `E/<name>.json` (name = training step, or the
checkpoint's file name); after every run: `E/summary.csv` (one row per JSON in E), TensorBoard scalars
under `E/tensorboard`, and PNG plots under `E/plots` (ROC curves, predicted vs true values, metric vs
step). Only aggregate numbers are written: no video, patient or study identifier leaves this module.

Videos may differ in length (every real export does; `--frames K` keeps K evenly spaced frames of each
longer video, for speed): embeddings come from `echoclip_jax.embedder` (jitted fixed-shape batches of
frames laid end to end, sharded over all local devices). Per-frame embeddings drive the zero-shot tasks,
each frame-wise rule applied per video over its own frames (the paper); video embeddings (the model's
temporal pool: the mean of the frame embeddings) drive retrieval and patient identification.
"""
from __future__ import annotations

import csv
import dataclasses
import glob as globlib
import json
import math
import os
import re
import sys

import numpy as np

from echoclip_jax import metrics
from echoclip_jax import zero_shot as zs
from echoclip_jax.embedder import Embedder, SplitEmbeddings, embed_split  # noqa: F401 (this module's API)

PLOT_KEYS = re.compile(r"/(auc|mae|accuracy|mean_rank_fraction)$")


# ---------------------------------------------------------------------------------------- metrics


def _task_sims(embedder: Embedder, task: zs.Task, split: SplitEmbeddings) -> np.ndarray:
    """Similarities [M, P] of the split's frames (end to end, `split.lengths` per video) to the prompts."""
    texts, _ = zs.build_prompts(task)
    return zs.similarities(split.frames, embedder.texts(texts))


def compute_metrics(embedder: Embedder, split: SplitEmbeddings, tasks: list[zs.Task], *,
                    calibration: SplitEmbeddings | None = None, retrieval_chunk: int = 1024
                    ) -> tuple[dict, dict]:
    """(results, curves): JSON-able metrics of one checkpoint, and arrays for its plots."""
    lengths = split.lengths
    results: dict = {"num_videos": int(len(split.videos)), "num_frames": int(lengths.sum()),
                     "frames_per_video": {"min": int(lengths.min()), "max": int(lengths.max()),
                                          "mean": float(lengths.mean())},
                     "tasks": {}, "clinical_change": {}}
    curves: dict = {"binary": {}, "regression": {}}
    for task in tasks:
        labels = zs.task_labels(task, split.report, {"ef": split.ef})
        sims = _task_sims(embedder, task, split)
        calib = None
        if calibration is not None and task.mode == "binary":
            c_labels = zs.task_labels(task, calibration.report, {"ef": calibration.ef})
            c_sims = _task_sims(embedder, task, calibration)
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
    has_report = np.asarray([bool(r.strip()) for r in split.report])
    if has_report.sum() >= 2:
        report_embeds = embedder.texts([r for r, h in zip(split.report, has_report) if h])
        results["retrieval"] = metrics.retrieval_metrics(split.videos[has_report], report_embeds,
                                                         chunk_size=retrieval_chunk)
    pid = metrics.patient_identification(split.videos, split.patient_id, split.study_id)
    curves["patient_identification"] = {"labels": pid.pop("labels"), "scores": pid.pop("scores")}
    results["patient_identification"] = pid
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
    from echoclip_jax import checkpoint as ckpt
    from echoclip_jax import weights

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


# ---------------------------------------------------------------------------------------- outputs


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def flatten(results: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as {"a/b/c": value}; strings and lists are dropped."""
    flat = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[key] = float(v)
        elif v is None:
            flat[key] = math.nan
    return flat


def write_json(path: str, obj: dict) -> None:
    """Write via a temporary name, so an interrupted run never leaves a result that a resume would skip."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def read_results(out_dir: str) -> list[dict]:
    rows = []
    for path in sorted(globlib.glob(os.path.join(out_dir, "*.json"))):
        with open(path, encoding="utf-8") as f:
            rows.append(json.load(f))
    rows.sort(key=lambda r: (r.get("step") is None, r.get("step") or 0, r.get("name", "")))
    return rows


def write_summary(out_dir: str) -> str:
    """E/summary.csv: one row per result JSON in E, one column per numeric metric."""
    rows = read_results(out_dir)
    flats = [flatten({k: v for k, v in r.items() if k not in ("name", "step")}) for r in rows]
    columns = sorted({k for f in flats for k in f})
    path = os.path.join(out_dir, "summary.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "step", *columns])
        for r, flat in zip(rows, flats):
            writer.writerow([r["name"], "" if r.get("step") is None else r["step"],
                             *("" if math.isnan(flat.get(c, math.nan)) else f"{flat[c]:.6g}"
                               for c in columns)])
    return path


def write_tensorboard(out_dir: str, name: str, step: int | None, results: dict) -> None:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
    for key, value in flatten(results).items():
        if math.isfinite(value):
            writer.add_scalar(f"eval/{key}", value, global_step=step if step is not None else 0)
    writer.close()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_checkpoint(out_dir: str, name: str, curves: dict) -> list[str]:
    """ROC curves (binary tasks, patient identification) and predicted vs true (regression tasks)."""
    plt = _pyplot()
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    written = []
    rocs = dict(curves["binary"])
    rocs["patient identification"] = curves["patient_identification"]
    fig, ax = plt.subplots(figsize=(6, 6))
    for task, c in rocs.items():
        y = np.asarray(c["labels"]).astype(int)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = metrics.roc_curve(y, c["scores"])
            ax.plot(fpr, tpr, label=f"{task} (AUC {metrics.roc_auc(y, c['scores']):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, checkpoint {name}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    path = os.path.join(out_dir, "plots", f"{name}_roc.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    for task, c in curves["regression"].items():
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(c["true"], c["pred"], s=8, alpha=0.6)
        lo = float(min(np.min(c["true"]), np.min(c["pred"])))
        hi = float(max(np.max(c["true"]), np.max(c["pred"])))
        ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
        ax.set(xlabel=f"true {task}", ylabel=f"predicted {task}",
               title=f"{task}: MAE {metrics.mae(c['true'], c['pred']):.2f}, checkpoint {name}")
        path = os.path.join(out_dir, "plots", f"{name}_{task}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_metrics_vs_step(out_dir: str) -> str | None:
    """Headline metrics (AUCs, MAEs, accuracies, retrieval rank fractions) against the training step."""
    rows = [r for r in read_results(out_dir) if r.get("step") is not None]
    if not rows:
        return None
    flats = [flatten({k: v for k, v in r.items() if k not in ("name", "step")}) for r in rows]
    keys = sorted({k for f in flats for k in f if PLOT_KEYS.search(k) and "per_class" not in k})
    if not keys:
        return None
    plt = _pyplot()
    cols = 4
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [f.get(key, math.nan) for f in flats], "o-")
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    path = os.path.join(out_dir, "plots", "metrics_vs_step.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ driver


def run(config, sources: list[Source], *, data_dir: str, split: str, out_dir: str,
        tasks: list[zs.Task], frames: int | None = None, batch_size: int = 128,
        calibration_split: str | None = None, log=print) -> list[str]:
    """Evaluate every source without a result in out_dir; returns the names evaluated."""
    os.makedirs(out_dir, exist_ok=True)
    todo = [s for s in sources if not os.path.exists(os.path.join(out_dir, f"{s.name}.json"))]
    for s in sources:
        if s not in todo:
            log(f"skip {s.name}: {os.path.join(out_dir, s.name + '.json')} exists")
    from echoclip_jax import tokenizers, weights

    image_size = config.model.vision.image_size
    for source in todo:
        log(f"evaluate {source.name} ({source.spec}) on {data_dir} [{split}]")
        # weights and model config through weights.load's one rule (architecture: the stored config, which
        # must agree with --config; compute dtype and other run settings: --config)
        embedder = Embedder(weights.load_model(source.spec, config.model), tokenizers.from_config(config.tokenizer),
                            batch_size=batch_size)
        split_embeds = embed_split(embedder, data_dir, split, frames=frames, image_size=image_size)
        calibration = None
        if calibration_split:
            calibration = embed_split(embedder, data_dir, calibration_split, frames=frames,
                                      image_size=image_size)
        results, curves = compute_metrics(embedder, split_embeds, tasks, calibration=calibration)
        record = {"name": source.name, "step": source.step, "checkpoint": source.spec, "split": split,
                  "calibration_split": calibration_split, **results}
        plot_checkpoint(out_dir, source.name, curves)
        write_tensorboard(out_dir, source.name, source.step, results)
        write_json(os.path.join(out_dir, f"{source.name}.json"), record)
    write_summary(out_dir)
    plot_metrics_vs_step(out_dir)
    return [s.name for s in todo]


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
    flags.DEFINE_string("task_table", None, "zero-shot task table JSON (default configs/zero_shot_tasks.json)")
    flags.DEFINE_integer("frames", None, "at most this many evenly spaced frames per video, for speed (default: "
                                         "every frame in the records; videos may differ in length)")
    flags.DEFINE_integer("batch_size", 128, "frames (or prompts) per device batch, over all devices")
    flags.DEFINE_string("calibration_split", None, "choose binary thresholds on this split (e.g. val) "
                                                   "instead of on the evaluated split")
    return flags.FLAGS


def main(argv):
    del argv
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
        from echoclip_jax.config_validation import validate
        validate(flags.config, training=False)
        tasks = zs.load_tasks(flags.task_table, flags.tasks)
        sources = list_sources(checkpoint=flags.checkpoint, workdir=flags.workdir, steps=steps,
                               globs=flags.glob)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate: {e}")
    try:
        done = run(flags.config, sources, data_dir=flags.data_dir, split=flags.split, out_dir=flags.out,
                   tasks=tasks, frames=flags.frames, batch_size=flags.batch_size,
                   calibration_split=flags.calibration_split)
    except (ValueError, FileNotFoundError, ImportError) as e:  # weights or records that cannot be used
        sys.exit(f"evaluate: {e}")
    print(f"evaluated {len(done)} checkpoint(s), skipped {len(sources) - len(done)}; "
          f"summary: {os.path.join(flags.out, 'summary.csv')}")


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
