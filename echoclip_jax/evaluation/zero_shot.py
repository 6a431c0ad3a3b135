"""Zero-shot tasks as data: the task table, prompt building, label extraction from reports, scoring.

A task table is a JSON object {task name: spec}, in the format of the paper's published prompts
(the package's `echoclip_jax/config/zero_shot_tasks.json` is the paper's 16 tasks):
  mode            "binary" | "categorical" | "regression"
  label_sources   report phrases that define the label; `<#>` stands for a number
  testers         prompts used for scoring (default: label_sources)
  values          categorical: the class value of each label source
  tester_values   categorical: the class value of each tester (default: values)
  value_mapping   categorical: {value: class name}; a "0" entry is the class of reports that match no source
  range           regression: [lo, hi]; prompts are filled with every integer in it
  label_column    optional record field that holds the label when known (EchoNet's "ef"); wins over the report
  aliases         optional other names for --tasks
  report_phrases  optional: more phrases (same syntax) that define the label as label_sources do, but are
                  never prompts: other wordings of the finding as readers write it (clean_text form)
  report_phrase_values  categorical: the class value of each report phrase

Labels come from the report with one rule for every task, driven by the table's phrases (see
`source_pattern`). Scores come from similarities of each video's L2-normalised frame embeddings to P
L2-normalised prompt embeddings: dense `sims[N, T, P]`, or ragged `sims[M, P]` with `lengths[N]` for
videos of different lengths (every frame-wise rule is applied per video, over its own frames).
The same rules answer per study (`echoclip_jax.evaluation.study_level`): a study's frames are its videos' frames end
to end, and optional per-frame `weights` (each unit's summing to 1) turn every frame mean into a weighted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from importlib import resources
from typing import Sequence

import numpy as np

from echoclip_jax.evaluation import metrics

DEFAULT_TABLE = str(resources.files("echoclip_jax.config") / "zero_shot_tasks.json")  # package data
MODES = ("binary", "categorical", "regression")
NUMBER = r"(\d+\.?\d*)"  # the number syntax of EchoCLIP's template tokenizer
TOP_FRACTION = 0.2  # regression: median of the top 20% of candidate values (the paper)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    mode: str
    label_sources: tuple[str, ...]
    testers: tuple[str, ...]
    source_values: tuple[float, ...] = ()  # categorical
    tester_values: tuple[float, ...] = ()  # categorical
    value_mapping: dict = dataclasses.field(default_factory=dict)  # categorical
    value_range: tuple[int, int] | None = None  # regression
    label_column: str | None = None
    aliases: tuple[str, ...] = ()
    report_phrases: tuple[str, ...] = ()  # label-defining wordings that are not prompts
    report_phrase_values: tuple[float, ...] = ()  # categorical


# ------------------------------------------------------------------------------------ the table


def _task_from_spec(name: str, spec: dict, path: str) -> Task:
    def bad(problem: str) -> ValueError:
        return ValueError(f"{path}: task {name!r}: {problem}")

    if not isinstance(spec, dict):
        raise bad("spec must be a JSON object")
    mode = spec.get("mode")
    if mode not in MODES:
        raise bad(f"mode must be one of {MODES}, got {mode!r}")
    sources = spec.get("label_sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s.strip() for s in sources):
        raise bad("label_sources must be a non-empty list of non-empty strings")
    testers = spec.get("testers", sources)
    if not isinstance(testers, list) or not testers or not all(isinstance(s, str) for s in testers):
        raise bad("testers must be a non-empty list of strings")
    fields = dict(
        name=name,
        mode=mode,
        label_sources=tuple(sources),
        testers=tuple(testers),
        label_column=spec.get("label_column"),
        aliases=tuple(spec.get("aliases", ())),
    )
    phrases = spec.get("report_phrases", [])
    if not isinstance(phrases, list) or not all(isinstance(s, str) and s.strip() for s in phrases):
        raise bad("report_phrases must be a list of non-empty strings")
    fields["report_phrases"] = tuple(phrases)
    if mode == "categorical":
        phrase_values = spec.get("report_phrase_values", [])
        if not isinstance(phrase_values, list) or len(phrase_values) != len(phrases):
            raise bad(f"categorical needs 'report_phrase_values', one per report phrase ({len(phrases)})")
        fields["report_phrase_values"] = tuple(float(v) for v in phrase_values)
    if mode == "regression" and any("<#>" not in p for p in phrases):
        raise bad("every regression report phrase needs a <#> for the value")
    if mode == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or len(values) != len(sources):
            raise bad(f"categorical needs 'values', one per label source ({len(sources)})")
        tester_values = spec.get("tester_values", values if "testers" not in spec else None)
        if not isinstance(tester_values, list) or len(tester_values) != len(testers):
            raise bad(f"categorical needs 'tester_values', one per tester ({len(testers)})")
        mapping = {float(k): v for k, v in spec.get("value_mapping", {}).items()}
        fields.update(
            source_values=tuple(float(v) for v in values),
            tester_values=tuple(float(v) for v in tester_values),
            value_mapping=mapping,
        )
    if mode == "regression":
        rng = spec.get("range")
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng) and rng[0] < rng[1]):
            raise bad(f"regression needs 'range': [lo, hi] integers with lo < hi, got {rng!r}")
        missing = [t for t in testers if "<#>" not in t]
        if missing:
            raise bad(f"every regression prompt needs a <#> for the value; not in {missing[0]!r}")
        fields["value_range"] = (rng[0], rng[1])
    return Task(**fields)


def load_tasks(path: str | None = None, names: Sequence[str] | None = None) -> list[Task]:
    """Tasks of a table (default: the paper's), optionally only `names` (table names or aliases)."""
    path = path or DEFAULT_TABLE
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: zero-shot task table not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path}: a task table is a non-empty JSON object {{task name: spec}}")
    tasks = [_task_from_spec(name, spec, path) for name, spec in table.items()]
    if names is None:
        return tasks
    lookup = {}
    for t in tasks:
        for key in (t.name, *t.aliases):
            lookup[key] = t
    unknown = [n for n in names if n not in lookup]
    if unknown:
        raise ValueError(f"{path}: unknown task(s) {unknown}; known: {sorted(lookup)}")
    return [lookup[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------- prompts


def build_prompts(task: Task) -> tuple[list[str], np.ndarray | None]:
    """The prompts to embed and, for categorical/regression, the value each stands for.

    Regression prompts are every tester filled with every integer of the range ("<#>" -> "55").
    """
    if task.mode == "binary":
        return list(task.testers), None
    if task.mode == "categorical":
        return list(task.testers), np.asarray(task.tester_values, dtype=np.float64)
    lo, hi = task.value_range
    texts, values = [], []
    for prompt in task.testers:
        for v in range(lo, hi + 1):
            texts.append(prompt.replace("<#>", str(v)))
            values.append(float(v))
    return texts, np.asarray(values)


# ------------------------------------------------------------------------------------------ labels


def source_pattern(source: str) -> re.Pattern:
    """Regex for a report phrase: any whitespace run matches any whitespace run, `<#>` captures a number,
    the phrase's final period is optional, and the match may not start or end inside a word."""
    core = " ".join(source.split()).rstrip(".").rstrip()
    parts = [re.escape(p).replace(r"\ ", r"\s+") for p in core.split("<#>")]
    return re.compile(r"(?<![A-Z0-9/])" + NUMBER.join(parts) + r"\.?(?![A-Z0-9])")


def _compiled(task: Task) -> list[re.Pattern]:
    """The label sources' patterns, then the report phrases' (values: `_values`)."""
    return [source_pattern(s) for s in task.label_sources + task.report_phrases]


def _values(task: Task) -> tuple[float, ...]:
    """Categorical: the class value of each pattern of `_compiled`."""
    return task.source_values + task.report_phrase_values


def extract_label(task: Task, report: str, patterns: list[re.Pattern] | None = None) -> float | None:
    """The task's label in a (clean_text-normalised) report, or None when the report does not say.

    Label sources and report phrases count alike. binary: 1 if any occurs, else 0. categorical: the
    largest value among those that occur (the most severe grade mentioned); a report that matches none
    gets class 0 when the table names a 0 class, else None. regression: the number in the leftmost
    occurring one, None when absent or outside the range.
    """
    patterns = patterns or _compiled(task)
    text = " ".join(report.upper().split())
    matches = [(m, i) for i, p in enumerate(patterns) for m in [p.search(text)] if m]
    if task.mode == "binary":
        return 1.0 if matches else 0.0
    if task.mode == "categorical":
        if matches:
            values = _values(task)
            return max(values[i] for _, i in matches)
        return 0.0 if 0.0 in task.value_mapping else None
    if not matches:
        return None
    m, _ = min(matches, key=lambda mi: mi[0].start())
    numbers = [g for g in m.groups() if g is not None]
    if not numbers:
        return None
    value = float(numbers[0])
    lo, hi = task.value_range
    return value if lo <= value <= hi else None


def task_labels(task: Task, reports: Sequence[str], columns: dict | None = None) -> np.ndarray:
    """One label per video (NaN = unknown). `columns[task.label_column]` (e.g. EchoNet's EF) wins over
    the report wherever it is finite."""
    patterns = _compiled(task)
    labels = np.asarray(
        [np.nan if (v := extract_label(task, r, patterns)) is None else v for r in reports], dtype=np.float64
    )
    if task.label_column and columns and task.label_column in columns:
        col = np.asarray(columns[task.label_column], dtype=np.float64)
        if col.shape != labels.shape:
            raise ValueError(
                f"label column {task.label_column!r} has {col.shape[0]} values for {labels.shape[0]} videos"
            )
        labels = np.where(np.isfinite(col), col, labels)
    return labels


# ----------------------------------------------------------------------------------------- scoring
#
# Scores take the similarities of each video's frames to the prompts in one of two layouts: dense
# sims[N, T, P] (every video has T frames), or ragged sims[M, P] over the M frames of all videos laid end
# to end with `lengths[N]` (video i owns the next lengths[i] rows; real exports have videos of different
# lengths). Every frame-wise rule is applied per video over that video's own frames.


def similarities(frame_embeds, prompt_embeds) -> np.ndarray:
    """[..., D] x [P, D] -> [..., P] cosine similarities (inputs already L2-normalised): [N, T, D] frames
    give [N, T, P]; ragged frames [M, D] give [M, P]."""
    f = np.asarray(frame_embeds, dtype=np.float32)
    p = np.asarray(prompt_embeds, dtype=np.float32)
    if f.ndim not in (2, 3) or p.ndim != 2 or f.shape[-1] != p.shape[-1]:
        raise ValueError(f"frame embeddings {f.shape} must be [N, T, D] or [M, D] and prompts {p.shape} [P, D]")
    return f @ p.T


def ragged(sims: np.ndarray, lengths=None) -> tuple[np.ndarray, np.ndarray]:
    """(sims [M, P], lengths [N]) of either layout; checks that the lengths cover the frames."""
    sims = np.asarray(sims)
    if lengths is None:
        if sims.ndim != 3:
            raise ValueError(f"similarities {sims.shape}: expected [N, T, P], or [M, P] with per-video lengths")
        n, t = sims.shape[:2]
        return sims.reshape(n * t, sims.shape[2]), np.full(n, t, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if sims.ndim != 2 or lengths.ndim != 1 or (lengths < 1).any() or int(lengths.sum()) != len(sims):
        raise ValueError(
            f"ragged similarities {sims.shape} need [M, P] with lengths >= 1 summing to M; "
            f"got {len(lengths)} lengths summing to {int(lengths.sum())}"
        )
    return sims, lengths


def video_mean(x: np.ndarray, lengths: np.ndarray, weights=None) -> np.ndarray:
    """Per-video mean of frame-wise values x[M, ...] -> [N, ...] (float64 sums); with `weights[M]` the
    weighted mean (each unit's weights normalised by their sum: the study-level weighted pool)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if weights is not None:
        w = np.asarray(weights, np.float64)
        if w.shape != (len(x),):
            raise ValueError(f"{w.shape} frame weights for {len(x)} frames")
        sums = np.add.reduceat(
            np.asarray(x) * w.reshape(-1, *([1] * (np.ndim(x) - 1))), starts, axis=0, dtype=np.float64
        )
        return sums / np.add.reduceat(w, starts).reshape(-1, *([1] * (sums.ndim - 1)))
    sums = np.add.reduceat(np.asarray(x), starts, axis=0, dtype=np.float64)
    return sums / lengths.reshape(-1, *([1] * (sums.ndim - 1)))


def select_videos(sims: np.ndarray, lengths, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The videos where `keep[N]` is true, in the layout given (lengths None = dense)."""
    if lengths is None:
        return np.asarray(sims)[keep], None
    lengths = np.asarray(lengths, np.int64)
    return np.asarray(sims)[np.repeat(keep, lengths)], lengths[keep]


def score_binary(sims: np.ndarray, lengths=None, weights=None) -> np.ndarray:
    """Mean cosine similarity over a video's frames and the positive prompts (`weights`: see video_mean)."""
    flat, lengths = ragged(sims, lengths)
    return video_mean(flat.mean(axis=1, dtype=np.float64), lengths, weights)


def categorical_scores(
    sims: np.ndarray, values: np.ndarray, lengths=None, weights=None
) -> tuple[np.ndarray, np.ndarray]:
    """(classes, scores[N, C]): a class's score is its best prompt's frame-averaged similarity, so the
    argmax over classes is the argmax over class prompts."""
    per_prompt = video_mean(*ragged(sims, lengths), weights)  # [N, P]
    classes = np.unique(values)
    scores = np.stack([per_prompt[:, values == c].max(axis=1) for c in classes], axis=1)
    return classes, scores


def predict_categorical(sims: np.ndarray, values: np.ndarray, lengths=None) -> np.ndarray:
    classes, scores = categorical_scores(sims, values, lengths)
    return classes[scores.argmax(axis=1)]


def _top_k(num_candidates: int, top_fraction: float) -> int:
    return max(1, int(num_candidates * top_fraction))


def _ranked_values(sims: np.ndarray, values: np.ndarray) -> np.ndarray:
    # Stable sort on -sims: among equal similarities the earlier prompt ranks first.
    return values[np.argsort(-sims, axis=-1, kind="stable")]


def predict_regression(
    sims: np.ndarray,
    values: np.ndarray,
    lengths=None,
    *,
    variant: str = "paper",
    top_fraction: float = TOP_FRACTION,
    weights=None,
) -> np.ndarray:
    """Value predicted for each video from its frames' similarities to prompts standing for `values[P]`.

    "paper": per frame, rank the candidate values by similarity and take the median of the top 20%;
    then average the video's frame predictions.
    "repository": EchoCLIP's released code: rank per frame, average the ranked values across the video's
    frames rank by rank, then take the median of the top 20% (torch's median: the lower middle value).
    `weights`: frame means become weighted means (see video_mean).
    """
    values = np.asarray(values, dtype=np.float64)
    flat, lengths = ragged(sims, lengths)
    if flat.shape[-1] != len(values):
        raise ValueError(f"{flat.shape[-1]} prompt similarities for {len(values)} values")
    if variant not in ("paper", "repository"):
        raise ValueError(f"unknown regression variant {variant!r} (use 'paper' or 'repository')")
    k = _top_k(len(values), top_fraction)
    ranked = (
        np.concatenate(
            [
                _ranked_values(flat[i : i + 16384], values)[:, :k]  # [M, k], in slices of frames
                for i in range(0, len(flat), 16384)
            ]
        )
        if len(flat)
        else np.zeros((0, k))
    )
    if variant == "paper":
        return video_mean(np.median(ranked, axis=-1), lengths, weights)
    averaged = np.sort(video_mean(ranked, lengths, weights), axis=-1)  # [N, k]
    return averaged[:, (k - 1) // 2]


# ------------------------------------------------------------------------------------- evaluation


def evaluate_task(
    task: Task, sims: np.ndarray, labels: np.ndarray, *, lengths=None, calibration: tuple | None = None, weights=None
) -> dict:
    """Metrics of one task over the videos with a known label (labels NaN = unknown, left out).

    `sims` dense [N, T, P], or ragged [M, P] with `lengths[N]` (see above). Returns a JSON-able dict of
    metrics plus "_curves" (arrays for plots) that callers drop before saving. `calibration = (labels,
    scores)` from another split sets the binary threshold. `weights[M]` (ragged only): per-frame weights of
    the weighted study pool (see video_mean).
    """
    known = np.isfinite(labels)
    y = labels[known]
    s, ls = select_videos(sims, lengths, known)
    if weights is not None:
        if lengths is None:
            raise ValueError("frame weights need the ragged layout (sims [M, P] with lengths)")
        weights = np.asarray(weights)[np.repeat(known, np.asarray(lengths, np.int64))]
    out: dict = {"mode": task.mode, "n": int(known.sum())}
    if not known.any():
        return out
    if task.mode == "binary":
        scores = score_binary(s, ls, weights)
        out.update(metrics.binary_metrics(y.astype(int), scores, calibration=calibration))
        out["_curves"] = {"labels": y.astype(int), "scores": scores}
    elif task.mode == "categorical":
        _, values = build_prompts(task)
        classes, scores = categorical_scores(s, values, ls, weights)
        pred = classes[scores.argmax(axis=1)]
        scorable = np.isin(y, classes)  # e.g. "normal" has no prompt: it can never be predicted
        out["accuracy"] = metrics.accuracy(y[scorable], pred[scorable]) if scorable.any() else math.nan
        out["n_scorable"] = int(scorable.sum())
        aucs = metrics.per_class_auc(y, scores, list(classes))
        names = task.value_mapping
        out["per_class_auc"] = {str(names.get(c, c)): v for c, v in aucs.items()}
        finite = [v for v in aucs.values() if np.isfinite(v)]
        out["macro_auc"] = float(np.mean(finite)) if finite else math.nan
        out["class_counts"] = {str(names.get(c, c)): int((y == c).sum()) for c in np.unique(y)}
    else:
        _, values = build_prompts(task)
        for variant in ("paper", "repository"):
            pred = predict_regression(s, values, ls, variant=variant, weights=weights)
            suffix = "" if variant == "paper" else "_repository"
            out["mae" + suffix] = metrics.mae(y, pred)
            out["r2" + suffix] = metrics.r2(y, pred)
            if variant == "paper":
                out["_curves"] = {"true": y, "pred": pred}
    return out
