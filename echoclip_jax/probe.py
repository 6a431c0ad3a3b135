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
columns; `echoclip_jax.probe_labels` writes one for the synthetic cohort. A label is a classification
(non-numeric, or at most MAX_CLASSES distinct integers) or a regression (other numbers), unless
`--task NAME=...` says which. Items without a label row, or with the label empty, are skipped and counted.
A study's embedding is the mean of its videos' embeddings, re-normalised; its label is the study's row.

Writes P/probe.json (per label and probe: metrics, baseline, n_train, n_eval, skipped counts, chosen
hyperparameters) and P/plots/ (confusion matrices, predicted vs true). Only aggregate numbers are written
or logged: no video, patient or study identifier leaves this module.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import warnings

import numpy as np

from echoclip_jax.probes.attentive import DEFAULTS as ATTENTIVE_DEFAULTS
from echoclip_jax.probes.metrics import baseline, classification_metrics, plot, predict, regression_metrics, score

KEYS = ("video_id", "study_id")
TASKS = ("classification", "regression")
PROBES = ("linear", "attentive")
MAX_CLASSES = 10
MAX_FOLDS = 5
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ALPHA_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


# ---------------------------------------------------------------------------------------- labels


def read_labels(path: str, key: str, labels: list[str]) -> dict[str, dict[str, str]]:
    """{label: {key value: raw string}} from the CSV at `path` (empty strings kept: skipped later)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in (key, *labels) if c not in columns]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} (columns: {', '.join(columns)})")
        table: dict[str, dict[str, str]] = {name: {} for name in labels}
        for row in reader:
            for name in labels:
                table[name][row[key]] = (row[name] or "").strip()
    return table


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if np.isfinite(x) else None


def detect_task(values) -> str:
    """"classification" for non-numeric values or at most MAX_CLASSES distinct integers, else
    "regression" (numbers with fractions, or many distinct integers). Empty values are ignored."""
    values = [v for v in values if v != ""]
    numbers = [_number(v) for v in values]
    if not values or any(x is None for x in numbers):
        return "classification"
    integral = all(float(x).is_integer() for x in numbers)
    return "classification" if integral and len(set(numbers)) <= MAX_CLASSES else "regression"


def _targets(raw: list[str], task: str):
    """Raw strings -> class labels (strings; "1.0" and "1" are one class) or floats."""
    if task == "regression":
        numbers = [_number(v) for v in raw]
        bad = sorted({v for v, x in zip(raw, numbers) if x is None})
        if bad:
            raise ValueError(f"a regression label has non-numeric values, e.g. {bad[:3]}")
        return np.asarray(numbers, np.float64)
    as_int = [_number(v) for v in raw]
    if all(x is not None and float(x).is_integer() for x in as_int):
        raw = [str(int(x)) for x in as_int]
    return np.asarray(raw, dtype=object).astype(str)


# ---------------------------------------------------------------------------------------- items


@dataclasses.dataclass
class Items:
    """A split's probe items (videos, or studies): embedding [N, D], frame embeddings (one [T_i, D] per
    item), and the key and patient of each (used for joining and fold grouping; never written)."""
    embeddings: np.ndarray
    frames: list
    keys: list
    patients: list


def items_for(split, key: str) -> Items:
    """The items of a `SplitEmbeddings` for `key`: its videos, or its studies (a study's embedding is the
    re-normalised mean of its videos' embeddings; its frames are all its videos' frames)."""
    starts = np.concatenate([[0], np.cumsum(split.lengths)[:-1]])
    frames = [split.frames[a:a + n] for a, n in zip(starts, split.lengths)]
    if key == "video_id":
        if split.video_id is None:
            raise ValueError("these embeddings carry no video ids; embed the records again")
        return Items(np.asarray(split.videos, np.float32), frames, list(split.video_id), list(split.patient_id))
    if key != "study_id":
        raise ValueError(f"--key {key!r}: expected one of {', '.join(KEYS)}")
    groups: dict = {}
    for i, study in enumerate(split.study_id):
        groups.setdefault(study, []).append(i)
    emb = np.stack([split.videos[idx].mean(0) for idx in groups.values()]).astype(np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return Items(emb, [np.concatenate([frames[i] for i in idx]) for idx in groups.values()], list(groups),
                 [split.patient_id[idx[0]] for idx in groups.values()])


def cv_folds(groups, max_folds: int = MAX_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, held-out indices) per fold, grouped so that no group (patient) is on both sides;
    min(max_folds, number of groups) folds; [] with fewer than 2 groups."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(set(groups))
    if n_groups < 2:
        return []
    splitter = GroupKFold(n_splits=min(max_folds, n_groups))
    return list(splitter.split(np.zeros((len(groups), 1)), groups=list(groups)))


# ---------------------------------------------------------------------------------------- probes


def fit_linear(x: np.ndarray, y: np.ndarray, groups, task: str):
    """(fitted pipeline, hyperparameters, folds): StandardScaler + LogisticRegression (classification) or
    Ridge (regression), the strength chosen on patient-grouped folds of the training items."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from scipy.linalg import LinAlgWarning

    if task == "classification":
        model, name, grid, scoring = LogisticRegression(max_iter=5000), "C", C_GRID, "balanced_accuracy"
    else:
        model, name, grid, scoring = Ridge(), "alpha", ALPHA_GRID, "neg_mean_absolute_error"
    pipe = make_pipeline(StandardScaler(), model)
    folds = cv_folds(groups)
    param = f"{type(model).__name__.lower()}__{name}"
    if not folds:
        pipe.fit(x, y)
        return pipe, {name: float(getattr(model, name)), "cv": "none (fewer than 2 training patients)"}, folds
    search = GridSearchCV(pipe, {param: list(grid)}, cv=folds, scoring=scoring)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # a fold lacking a class
        warnings.filterwarnings("ignore", category=LinAlgWarning)  # the smallest alphas; the chosen one is kept
        search.fit(x, y)
    hp = {name: float(search.best_params_[param]), "grid": list(grid), "cv_folds": len(folds),
          "cv_grouped_by": "patient_id", "cv_scoring": scoring, "cv_best_score": float(search.best_score_)}
    return search.best_estimator_, hp, folds


# ---------------------------------------------------------------------------------------- driver


def _join(items: Items, values: dict[str, str]):
    """(indices of the items with a non-empty label, their raw labels, skipped counts)."""
    keep, raw, no_row, empty = [], [], 0, 0
    for i, k in enumerate(items.keys):
        v = values.get(k)
        if v is None:
            no_row += 1
        elif v == "":
            empty += 1
        else:
            keep.append(i)
            raw.append(v)
    return np.asarray(keep, np.int64), raw, {"no_label_row": no_row, "empty_label": empty}


def probe_label(train: Items, evaluation: Items, values: dict[str, str], *, label: str, task: str | None,
                probes=PROBES, out_dir: str | None = None, attentive: dict | None = None) -> dict:
    """One label's result: task, counts, and per probe its metrics beside the baseline and the chosen
    hyperparameters (an "error" instead where the training items cannot train a probe)."""
    from echoclip_jax.probes import attentive as probe_attentive

    i_tr, raw_tr, skip_tr = _join(train, values)
    i_ev, raw_ev, skip_ev = _join(evaluation, values)
    source = "given" if task else "detected"
    task = task or detect_task(raw_tr + raw_ev)
    if task not in TASKS:
        raise ValueError(f"{label}: task {task!r}, expected one of {', '.join(TASKS)}")
    out: dict = {"task": task, "task_source": source, "n_train": int(len(i_tr)), "n_eval": int(len(i_ev)),
                 "skipped": {"train": skip_tr, "eval": skip_ev}, "probes": {}}
    y_tr, y_ev = _targets(raw_tr, task), _targets(raw_ev, task)
    classes = sorted(set(y_tr)) if task == "classification" else []
    if task == "classification":
        out["classes"] = [str(c) for c in sorted(set(y_tr) | set(y_ev))]
    problem = ("no labelled training items" if not len(i_tr) else "no labelled evaluation items" if not len(i_ev)
               else "one class only in the training split" if task == "classification" and len(classes) < 2
               else None)
    if problem:
        out["error"] = problem
        return out
    x_tr, x_ev = train.embeddings[i_tr], evaluation.embeddings[i_ev]
    out["baseline"] = baseline(x_tr, y_tr, x_ev, y_ev, task)
    for probe in probes:
        if probe == "linear":
            estimator, hp, _ = fit_linear(x_tr, y_tr, [train.patients[i] for i in i_tr], task)
            prediction = predict(estimator, x_ev, task)
        elif probe == "attentive":
            fitted = probe_attentive.fit([train.frames[i] for i in i_tr], y_tr, task, **(attentive or {}))
            prediction = probe_attentive.predict(fitted, [evaluation.frames[i] for i in i_ev])
            hp = {**fitted.hyperparameters, "final_train_loss": fitted.losses[-1]}
        else:
            raise ValueError(f"probe {probe!r}: expected one of {', '.join(PROBES)}")
        result = {"metrics": score(task, y_ev, prediction, classes), "hyperparameters": hp}
        if out_dir:
            result["plot"] = os.path.relpath(plot(out_dir, label, probe, task, y_ev, prediction), out_dir)
        out["probes"][probe] = result
    return out


def probe_splits(train, evaluation, table: dict[str, dict[str, str]], *, key: str, out_dir: str | None,
                 probes=PROBES, tasks: dict | None = None, attentive: dict | None = None, log=print,
                 meta: dict | None = None) -> dict:
    """Every label of `table` ({label: {key value: raw}}) probed from the `SplitEmbeddings` of the training
    and evaluated splits; writes out_dir/probe.json and out_dir/plots/ when out_dir is given."""
    tr, ev = items_for(train, key), items_for(evaluation, key)
    shared = set(tr.patients) & set(ev.patients)
    if shared:
        raise ValueError(f"{len(shared)} patient(s) in both the training and the evaluated split: a probe "
                         f"scored on patients it was trained on would overstate what the embeddings carry")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    record = {**(meta or {}), "key": key, "probes": list(probes), "embed_dim": int(tr.embeddings.shape[1]),
              "n_items": {"train": len(tr.keys), "eval": len(ev.keys)}, "labels": {}}
    for label, values in table.items():
        res = probe_label(tr, ev, values, label=label, task=(tasks or {}).get(label), probes=probes,
                          out_dir=out_dir, attentive=attentive)
        record["labels"][label] = res
        _log_label(log, label, res)
    if out_dir:
        write_json(os.path.join(out_dir, "probe.json"), record)
    return record


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        obj = obj.item()
    return None if isinstance(obj, float) and not np.isfinite(obj) else obj


def write_json(path: str, obj: dict) -> None:
    """Writes via a temporary name (an interrupted run leaves no half file); NaN becomes null."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)


def _log_label(log, label: str, res: dict) -> None:
    skipped = {s: sum(c.values()) for s, c in res["skipped"].items()}
    head = f"{label} ({res['task']}): n_train {res['n_train']}, n_eval {res['n_eval']}, skipped {skipped}"
    if "error" in res:
        log(f"{head}: {res['error']}")
        return
    name = "accuracy" if res["task"] == "classification" else "mae"
    parts = [f"{p} {name} {r['metrics'][name]:.3f}" for p, r in res["probes"].items()]
    log(f"{head}: {', '.join(parts)} (baseline {res['baseline'][name]:.3f})")


def embed(config, checkpoint: str, data_dir: str, splits, *, frames: int | None = None,
          batch_size: int = 128) -> dict:
    """{split: SplitEmbeddings} of the records through the checkpoint's image tower (no tokenizer needed)."""
    from echoclip_jax.weights import loader as weights
    from echoclip_jax.config.validation import validate
    from echoclip_jax.inference.embedder import Embedder, embed_split

    validate(config, training=False)
    embedder = Embedder(weights.load_model(checkpoint, config.model), None, batch_size=batch_size)
    return {s: embed_split(embedder, data_dir, s, frames=frames, image_size=config.model.vision.image_size)
            for s in dict.fromkeys(splits)}


def run(config, checkpoint: str, data_dir: str, labels_csv: str, *, labels: list[str], key: str = "video_id",
        out_dir: str, train_split: str = "train", eval_split: str = "test", probes=PROBES,
        tasks: dict | None = None, frames: int | None = None, batch_size: int = 128,
        attentive: dict | None = None, embeddings: dict | None = None, log=print) -> dict:
    """The CLI without a subprocess: embeds both splits (or takes `embeddings`, {split: SplitEmbeddings}
    from `embed`, to probe several keys or label files from one embedding pass), probes every label and
    writes out_dir/probe.json and plots; returns probe.json's content."""
    if key not in KEYS:
        raise ValueError(f"key {key!r}: expected one of {', '.join(KEYS)}")
    unknown = sorted(set(tasks or {}) - set(labels))
    if unknown:
        raise ValueError(f"--task for label(s) not probed: {unknown}")
    table = read_labels(labels_csv, key, labels)
    if embeddings is None:
        log(f"embed {data_dir} [{train_split}, {eval_split}] with {checkpoint}")
        embeddings = embed(config, checkpoint, data_dir, (train_split, eval_split), frames=frames,
                           batch_size=batch_size)
    meta = {"checkpoint": str(checkpoint), "train_split": train_split, "eval_split": eval_split, "frames": frames}
    return probe_splits(embeddings[train_split], embeddings[eval_split], table, key=key, out_dir=out_dir,
                        probes=probes, tasks=tasks, attentive=attentive, log=log, meta=meta)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)")
    flags.DEFINE_string("checkpoint", None, "weights, KIND:PATH[@STEP] (orbax, params, safetensors, open_clip)")
    flags.DEFINE_string("data_dir", None, "records from data_prep.convert")
    flags.DEFINE_string("labels", None, "labels CSV: a key column and label columns")
    flags.DEFINE_multi_string("label", None, "a label column to probe (repeatable)")
    flags.DEFINE_enum("key", "video_id", KEYS, "what a labels row describes: a video or a study")
    flags.DEFINE_string("out", None, "output directory (probe.json, plots/)")
    flags.DEFINE_string("train_split", "train", "split the probes are trained on")
    flags.DEFINE_string("eval_split", "test", "split the probes are scored on")
    flags.DEFINE_enum("probe", "both", ("linear", "attentive", "both"), "which probes")
    flags.DEFINE_multi_string("task", None, "NAME=regression|classification: overrides detection")
    flags.DEFINE_integer("frames", None, "at most this many evenly spaced frames per video (default: all)")
    flags.DEFINE_integer("batch_size", 128, "frames per device batch when embedding")
    flags.DEFINE_integer("epochs", None, f"attentive probe epochs (default {ATTENTIVE_DEFAULTS['epochs']})")
    flags.DEFINE_integer("seed", 0, "attentive probe seed")
    return flags.FLAGS


def main(argv):
    del argv
    f = FLAGS
    missing = [n for n in ("config", "checkpoint", "data_dir", "labels", "label", "out") if not getattr(f, n)]
    if missing:
        sys.exit(f"probe: --{', --'.join(missing)} required")
    tasks = {}
    for item in f.task or []:
        name, _, task = item.partition("=")
        if task not in TASKS:
            sys.exit(f"probe: --task {item!r}: expected NAME=regression or NAME=classification")
        tasks[name] = task
    attentive = {"seed": f.seed, **({"epochs": f.epochs} if f.epochs else {})}
    try:
        run(f.config, f.checkpoint, f.data_dir, f.labels, labels=list(dict.fromkeys(f.label)), key=f.key,
            out_dir=f.out, train_split=f.train_split, eval_split=f.eval_split,
            probes=PROBES if f.probe == "both" else (f.probe,), tasks=tasks, frames=f.frames,
            batch_size=f.batch_size, attentive=attentive)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"probe: {e}")
    print(f"probe: wrote {os.path.join(f.out, 'probe.json')}")


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
