"""What a probe learns to predict: labels CSV rows joined to the records' videos or studies.

Labels come from a CSV with a key column (`video_id` or `study_id`: the records' salted ids) and label
columns. A label is a classification (non-numeric, or at most MAX_CLASSES distinct integers) or a
regression (other numbers), unless the caller says which. Items without a label row, or with the label
empty, are skipped and counted. A study's embedding is the mean of its videos' embeddings, re-normalised;
its label is the study's row.
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np

from echoclip_jax.runtime import storage

KEYS = ("video_id", "study_id")
TASKS = ("classification", "regression")
MAX_CLASSES = 10


def read_labels(path: str, key: str, labels: list[str]) -> dict[str, dict[str, str]]:
    """{label: {key value: raw string}} from the CSV at `path`, a local path or gs:// URL (empty strings
    kept: skipped later)."""
    reader = csv.DictReader(io.StringIO(storage.read_text(path), newline=""))
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
    """ "classification" for non-numeric values or at most MAX_CLASSES distinct integers, else
    "regression" (numbers with fractions, or many distinct integers). Empty values are ignored."""
    values = [v for v in values if v != ""]
    numbers = [_number(v) for v in values]
    if not values or any(x is None for x in numbers):
        return "classification"
    integral = all(float(x).is_integer() for x in numbers)
    return "classification" if integral and len(set(numbers)) <= MAX_CLASSES else "regression"


def targets_of(raw: list[str], task: str):
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
    frames = [split.frames[a : a + n] for a, n in zip(starts, split.lengths)]
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
    return Items(
        emb,
        [np.concatenate([frames[i] for i in idx]) for idx in groups.values()],
        list(groups),
        [split.patient_id[idx[0]] for idx in groups.values()],
    )


def join_labels(items: Items, values: dict[str, str]):
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
