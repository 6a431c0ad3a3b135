"""The zero-shot task table: tasks as data, their prompts, and their labels read from reports.

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
`source_pattern`). How a task is scored from the model's similarities is `echoclip_jax.evaluation.zero_shot`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from typing import Sequence

import numpy as np

from echoclip_jax.runtime import storage

DEFAULT_TABLE = str(resources.files("echoclip_jax.config") / "zero_shot_tasks.json")  # package data
MODES = ("binary", "categorical", "regression")
NUMBER = r"(\d+\.?\d*)"  # the number syntax of EchoCLIP's template tokenizer


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
        table = json.loads(storage.read_text(path))  # a local path or a gs:// URL
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
