"""Probes on frozen embeddings, end to end: embed two splits, probe every label, write the results.

Newer echo foundation models (EchoJEPA, PanEcho) are judged this way rather than zero-shot: the encoder
stays frozen, a small probe is trained on one split's embeddings and scored on another's. Per label, the
linear probe (`echoclip_jax.probes.linear`) and the attentive probe (`echoclip_jax.probes.attentive`: a
learned query over the frame embeddings of the video, or of all the study's videos), and computed the same
way on the same items a baseline: the training split's majority class or mean
(`echoclip_jax.probes.metrics`).

Writes OUT/probe.json (per label and probe: metrics, baseline, n_train, n_eval, skipped counts, chosen
hyperparameters) and OUT/plots/ (confusion matrices, predicted vs true); OUT and the labels CSV are local
paths or gs:// URLs. Only aggregate numbers are written or logged: no video, patient or study identifier
leaves this module.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from echoclip_jax.config.validation import validate
from echoclip_jax.inference.embedder import Embedder, embed_split
from echoclip_jax.probes import attentive as probe_attentive
from echoclip_jax.probes.labels import KEYS, TASKS, Items, detect_task, items_for, join_labels, read_labels, targets_of
from echoclip_jax.probes.linear import fit_linear
from echoclip_jax.probes.metrics import baseline, plot, predict, score
from echoclip_jax.runtime import storage
from echoclip_jax.weights import loader as weights

log = logging.getLogger(__name__)

PROBES = ("linear", "attentive")


def probe_label(
    train: Items,
    evaluation: Items,
    values: dict[str, str],
    *,
    label: str,
    task: str | None,
    probes=PROBES,
    out_dir: str | None = None,
    attentive: dict | None = None,
) -> dict:
    """One label's result: task, counts, and per probe its metrics beside the baseline and the chosen
    hyperparameters (an "error" instead where the training items cannot train a probe)."""

    i_tr, raw_tr, skip_tr = join_labels(train, values)
    i_ev, raw_ev, skip_ev = join_labels(evaluation, values)
    source = "given" if task else "detected"
    task = task or detect_task(raw_tr + raw_ev)
    if task not in TASKS:
        raise ValueError(f"{label}: task {task!r}, expected one of {', '.join(TASKS)}")
    out: dict = {
        "task": task,
        "task_source": source,
        "n_train": int(len(i_tr)),
        "n_eval": int(len(i_ev)),
        "skipped": {"train": skip_tr, "eval": skip_ev},
        "probes": {},
    }
    y_tr, y_ev = targets_of(raw_tr, task), targets_of(raw_ev, task)
    classes = sorted(set(y_tr)) if task == "classification" else []
    if task == "classification":
        out["classes"] = [str(c) for c in sorted(set(y_tr) | set(y_ev))]
    problem = (
        "no labelled training items"
        if not len(i_tr)
        else "no labelled evaluation items"
        if not len(i_ev)
        else "one class only in the training split"
        if task == "classification" and len(classes) < 2
        else None
    )
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
            result["plot"] = plot(out_dir, label, probe, task, y_ev, prediction)
        out["probes"][probe] = result
    return out


def probe_splits(
    train,
    evaluation,
    table: dict[str, dict[str, str]],
    *,
    key: str,
    out_dir: str | None,
    probes=PROBES,
    tasks: dict | None = None,
    attentive: dict | None = None,
    meta: dict | None = None,
) -> dict:
    """Every label of `table` ({label: {key value: raw}}) probed from the `SplitEmbeddings` of the training
    and evaluated splits; writes out_dir/probe.json and out_dir/plots/ when out_dir is given."""
    tr, ev = items_for(train, key), items_for(evaluation, key)
    shared = set(tr.patients) & set(ev.patients)
    if shared:
        raise ValueError(
            f"{len(shared)} patient(s) in both the training and the evaluated split: a probe "
            f"scored on patients it was trained on would overstate what the embeddings carry"
        )
    if out_dir:
        storage.makedirs(out_dir)
    record = {
        **(meta or {}),
        "key": key,
        "probes": list(probes),
        "embed_dim": int(tr.embeddings.shape[1]),
        "n_items": {"train": len(tr.keys), "eval": len(ev.keys)},
        "labels": {},
    }
    for label, values in table.items():
        res = probe_label(
            tr,
            ev,
            values,
            label=label,
            task=(tasks or {}).get(label),
            probes=probes,
            out_dir=out_dir,
            attentive=attentive,
        )
        record["labels"][label] = res
        _log_label(label, res)
    if out_dir:
        write_json(storage.join(out_dir, "probe.json"), record)
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
    """Writes `path` (local or gs://) whole: an interrupted run leaves no half file; NaN becomes null."""
    storage.write_text(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False))


def _log_label(label: str, res: dict) -> None:
    skipped = {s: sum(c.values()) for s, c in res["skipped"].items()}
    head = f"{label} ({res['task']}): n_train {res['n_train']}, n_eval {res['n_eval']}, skipped {skipped}"
    if "error" in res:
        log.info("%s: %s", head, res["error"])
        return
    name = "accuracy" if res["task"] == "classification" else "mae"
    parts = [f"{p} {name} {r['metrics'][name]:.3f}" for p, r in res["probes"].items()]
    log.info("%s: %s (baseline %.3f)", head, ", ".join(parts), res["baseline"][name])


def embed(config, checkpoint: str, data_dir: str, splits, *, frames: int | None = None, batch_size: int = 128) -> dict:
    """{split: SplitEmbeddings} of the records through the checkpoint's image tower (no tokenizer needed)."""

    validate(config, training=False)
    embedder = Embedder(weights.load_model(checkpoint, config.model), None, batch_size=batch_size)
    return {
        s: embed_split(embedder, data_dir, s, frames=frames, image_size=config.model.vision.image_size)
        for s in dict.fromkeys(splits)
    }


def run(
    config,
    checkpoint: str,
    data_dir: str,
    labels_csv: str,
    *,
    labels: list[str],
    key: str = "video_id",
    out_dir: str,
    train_split: str = "train",
    eval_split: str = "test",
    probes=PROBES,
    tasks: dict | None = None,
    frames: int | None = None,
    batch_size: int = 128,
    attentive: dict | None = None,
    embeddings: dict | None = None,
) -> dict:
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
        log.info("embed %s [%s, %s] with %s", data_dir, train_split, eval_split, checkpoint)
        embeddings = embed(
            config, checkpoint, data_dir, (train_split, eval_split), frames=frames, batch_size=batch_size
        )
    meta = {"checkpoint": str(checkpoint), "train_split": train_split, "eval_split": eval_split, "frames": frames}
    return probe_splits(
        embeddings[train_split],
        embeddings[eval_split],
        table,
        key=key,
        out_dir=out_dir,
        probes=probes,
        tasks=tasks,
        attentive=attentive,
        meta=meta,
    )
