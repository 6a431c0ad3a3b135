"""What evaluate writes: result JSONs, summary.csv, TensorBoard scalars and PNG plots, for both levels.

Every writer takes aggregate numbers only (no identifier reaches this module). The study block of a
result (`study`, see `echoclip_jax.evaluation.study_level`) flattens to `study/...` columns, scalars and panels like
the video-level keys; plots are drawn only for what has data: a task whose labels are all unknown (or of
one class) gets no curve, a metric that is NaN at every step or level gets no panel, and a figure with
nothing to draw is not written. The output folder is a local path or a gs:// URL: every file is written
whole (`echoclip_jax.runtime.storage`; figures and TensorBoard events are made in memory or a temporary
local file first).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile

import numpy as np
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

from echoclip_jax.evaluation import metrics
from echoclip_jax.runtime import storage

PLOT_KEYS = re.compile(r"/(auc|mae|accuracy|mean_rank_fraction)$")
LEVEL_COLOURS = {"video": "tab:blue", "study": "tab:orange"}


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
    """Written whole (a temporary name on local disk, one upload on a bucket), so an interrupted run never
    leaves a result that a resume would skip."""
    storage.write_text(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False))


def read_results(out_dir: str) -> list[dict]:
    rows = [storage.load_json(path) for path in storage.glob(out_dir, "*.json")]
    rows.sort(key=lambda r: (r.get("step") is None, r.get("step") or 0, r.get("name", "")))
    return rows


def write_summary(out_dir: str) -> str:
    """E/summary.csv: one row per result JSON in E, one column per numeric metric."""
    rows = read_results(out_dir)
    flats = [flatten({k: v for k, v in r.items() if k not in ("name", "step")}) for r in rows]
    columns = sorted({k for f in flats for k in f})
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["name", "step", *columns])
    for r, flat in zip(rows, flats):
        writer.writerow(
            [
                r["name"],
                "" if r.get("step") is None else r["step"],
                *("" if math.isnan(flat.get(c, math.nan)) else f"{flat[c]:.6g}" for c in columns),
            ]
        )
    path = storage.join(out_dir, "summary.csv")
    storage.write_text(path, text.getvalue())
    return path


def save_figure(fig: Figure, path: str, *, dpi: int) -> str:
    """Writes `fig` as the PNG `path` (local or gs://), whole."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    storage.write_bytes(path, buffer.getvalue())
    return path


def write_tensorboard(out_dir: str, name: str, step: int | None, results: dict) -> None:
    """E/tensorboard/: one events file of this result's finite scalars. For a bucket the file is written
    locally and uploaded whole (tensorboardX's own GCS writer re-uploads when garbage-collected, long after
    close, and waits minutes on a bucket it can no longer reach)."""
    folder = storage.join(out_dir, "tensorboard")
    with tempfile.TemporaryDirectory(prefix="echoclip_jax-tensorboard-") as local:
        writer = SummaryWriter(local if storage.is_remote(out_dir) else folder)
        for key, value in flatten(results).items():
            if math.isfinite(value):
                writer.add_scalar(f"eval/{key}", value, global_step=step if step is not None else 0)
        writer.close()
        if storage.is_remote(out_dir):
            storage.copytree(local, folder)


def plot_checkpoint(out_dir: str, name: str, curves: dict, *, level: str = "video") -> list[str]:
    """ROC curves (binary tasks, patient identification) and predicted vs true (regression tasks) of one
    level: `plots/<name>_roc.png`, `plots/<name>_<task>.png` (video), `plots/<name>_study_...` (study).
    Only curves with both classes are drawn; a ROC figure with none is not written."""
    written = []
    stem = name if level == "video" else f"{name}_{level}"
    where = "" if level == "video" else f" ({level} level)"
    rocs = dict(curves["binary"])
    if "patient_identification" in curves:
        rocs["patient identification"] = curves["patient_identification"]
    drawable = {task: c for task, c in rocs.items() if 0 < np.asarray(c["labels"]).astype(int).sum() < len(c["labels"])}
    if drawable:
        fig = Figure(figsize=(6, 6))
        ax = fig.subplots()
        for task, c in drawable.items():
            y = np.asarray(c["labels"]).astype(int)
            fpr, tpr, _ = metrics.roc_curve(y, c["scores"])
            ax.plot(fpr, tpr, label=f"{task} (AUC {metrics.roc_auc(y, c['scores']):.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC{where}, checkpoint {name}")
        ax.legend(fontsize=7, loc="lower right")
        written.append(save_figure(fig, storage.join(out_dir, "plots", f"{stem}_roc.png"), dpi=100))
    for task, c in curves["regression"].items():
        if not len(c["true"]):
            continue
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        ax.scatter(c["true"], c["pred"], s=8, alpha=0.6)
        lo = float(min(np.min(c["true"]), np.min(c["pred"])))
        hi = float(max(np.max(c["true"]), np.max(c["pred"])))
        ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
        ax.set(
            xlabel=f"true {task}",
            ylabel=f"predicted {task}",
            title=f"{task}{where}: MAE {metrics.mae(c['true'], c['pred']):.2f}, checkpoint {name}",
        )
        written.append(save_figure(fig, storage.join(out_dir, "plots", f"{stem}_{task}.png"), dpi=100))
    return written


def plot_metrics_vs_step(out_dir: str) -> str | None:
    """Headline metrics (AUCs, MAEs, accuracies, retrieval rank fractions) against the training step."""
    rows = [r for r in read_results(out_dir) if r.get("step") is not None]
    if not rows:
        return None
    flats = [flatten({k: v for k, v in r.items() if k not in ("name", "step")}) for r in rows]
    keys = sorted(
        {
            k
            for f in flats
            for k in f
            if PLOT_KEYS.search(k) and "per_class" not in k and any(math.isfinite(g.get(k, math.nan)) for g in flats)
        }
    )  # no empty panels
    if not keys:
        return None
    cols = 4
    nrows = -(-len(keys) // cols)
    fig = Figure(figsize=(4 * cols, 2.6 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [f.get(key, math.nan) for f in flats], "o-")
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, storage.join(out_dir, "plots", "metrics_vs_step.png"), dpi=80)


def headline_figures(results: dict) -> dict[str, tuple[str, float]]:
    """{panel title: (better, value)} of one level's block: each task's AUC (binary), macro AUC
    (categorical) or MAE (regression), video/study -> report mean rank fraction, patient id AUC."""
    out = {}
    for task, r in results.get("tasks", {}).items():
        key, better = {
            "binary": ("auc", "higher"),
            "categorical": ("macro_auc", "higher"),
            "regression": ("mae", "lower"),
        }[r["mode"]]
        if key in r:
            out[f"{task} {key}"] = (better, r[key])
    if "retrieval" in results:
        out["retrieval mean rank fraction"] = ("lower", results["retrieval"]["image_to_text"]["mean_rank_fraction"])
    if "patient_identification" in results:
        out["patient identification auc"] = ("higher", results["patient_identification"]["auc"])
    return out


def level_panels(results: dict) -> dict[str, dict]:
    """{panel title: {"better": ..., "video": value, "study": value}} of a result with a study block: the
    headline figures that are finite at some level (a task with no labels, or one class, has none)."""
    levels = {
        "video": headline_figures(results) if "tasks" in results else {},
        "study": headline_figures(results.get("study", {})),
    }
    panels: dict = {}
    for lv, figures in levels.items():
        for title, (better, value) in figures.items():
            if value is not None and math.isfinite(value):
                panels.setdefault(title, {"better": better})[lv] = float(value)
    return panels


def plot_levels(out_dir: str, name: str, results: dict) -> str | None:
    """plots/<name>_levels.png: each headline figure at video and at study level side by side, one panel
    per `level_panels` entry; None (nothing written) without a study block or any finite figure."""
    panels = level_panels(results) if "study" in results else {}
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (title, panel) in zip(axes.flat, panels.items()):
        names = [lv for lv in LEVEL_COLOURS if lv in panel]
        values = [panel[lv] for lv in names]
        ax.bar(names, values, color=[LEVEL_COLOURS[lv] for lv in names])
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{title} ({panel['better']} is better)", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")  # the grid's unused cells: no panel
    fig.suptitle(f"video vs study level, checkpoint {name}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, storage.join(out_dir, "plots", f"{name}_levels.png"), dpi=80)
