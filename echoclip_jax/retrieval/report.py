"""A preliminary report by retrieval: the k reports of a report bank nearest to a study, and a vote over
them. It is a retrieval, not a diagnosis, and every output says so (DISCLAIMER).

Findings, extracted from each bank report with the zero-shot tasks' label rules (`task_table.extract_label`
over the package's zero-shot task table: ejection_fraction, pacemaker, tavr, mitraclip; LV size with the
table's LV-size phrases cut to their common "... DILATED LEFT VENTRICLE", its other readers' wordings, and
the normal-size wordings: `lv_size_task`): EF (median of the k reports' numbers; support = reports within
+-5), EF band, each device present/absent, LV size (votes among the reports that state it). Each finding
carries its support (how many of k agree), how many of k state it, and the agreeing reports' mean
similarity. `report_files` reports one study (a video file or a study directory) into OUT/report.json and
OUT/report.txt; `report_records` every study (and/or video) of a split of records into
OUT/study_reports.jsonl, OUT/video_reports.jsonl, OUT/reports.txt and OUT/summary.json (salted ids), leaving
out the reports of the query's own patient. OUT is a local directory or a gs:// folder.
"""

from __future__ import annotations

import collections
import functools
import json

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from echoclip_jax.evaluation import task_table
from echoclip_jax.retrieval import embedding as emb
from echoclip_jax.retrieval.bank import Bank
from echoclip_jax.runtime import storage

DISCLAIMER = (
    "PRELIMINARY REPORT BY RETRIEVAL, NOT A DIAGNOSIS: the findings are votes over the reports of the "
    "most similar studies in a report bank; a cardiologist must read this study."
)
EF_BANDS = (
    (70, "hyperdynamic"),
    (55, "normal"),
    (45, "mildly reduced"),
    (30, "moderately reduced"),
    (0, "severely reduced"),
)  # the systolic-function grades of EchoCLIP-style reports
DEVICES = ("pacemaker", "tavr", "mitraclip")
FINDINGS = ("ef", "ef_band", *DEVICES, "lv_size")
EF_TOLERANCE = 5.0
_LV_SIZES = ("normal", "mild", "moderate", "severe")
_LV_NORMAL_PHRASES = (
    "NORMAL LEFT VENTRICULAR SIZE.",
    "THE LEFT VENTRICLE IS NORMAL IN SIZE",
    "NORMAL LV CAVITY SIZE",
    "LV SIZE IS NORMAL",
    "LEFT VENTRICULAR CAVITY SIZE IS WITHIN NORMAL LIMITS",
)


@functools.lru_cache(maxsize=1)
def lv_size_task() -> task_table.Task:
    """LV size as a report states it: the zero-shot table's left_ventricle_size phrases cut to their common
    "... DILATED LEFT VENTRICLE", its report phrases (other readers' wordings of a dilated LV), and the
    normal-size wordings; classes 1 normal .. 4 severe; a report that states none is unknown (no 0 class)."""
    table = task_table.load_tasks(None, ["left_ventricle_size"])[0]
    return task_table.Task(
        name="lv_size",
        mode="categorical",
        label_sources=(
            _LV_NORMAL_PHRASES[0],
            "MILD DILATED LEFT VENTRICLE",
            "MODERATE DILATED LEFT VENTRICLE",
            "SEVERE DILATED LEFT VENTRICLE",
        ),
        testers=(_LV_NORMAL_PHRASES[0],),
        source_values=(1.0, 2.0, 3.0, 4.0),
        tester_values=(1.0,),
        report_phrases=_LV_NORMAL_PHRASES[1:] + table.report_phrases,
        report_phrase_values=(1.0,) * (len(_LV_NORMAL_PHRASES) - 1)
        + tuple(v + 1.0 for v in table.report_phrase_values),
        value_mapping={1.0: "normal", 2.0: "mild", 3.0: "moderate", 4.0: "severe"},
    )


def ef_band(ef) -> str | None:
    if ef is None or not np.isfinite(ef):
        return None
    return next(name for floor, name in EF_BANDS if ef >= floor)


def report_findings(reports: list[str]) -> list[dict]:
    """Per report: {ef: float|None, ef_band, pacemaker/tavr/mitraclip: "present"|"absent", lv_size: str|None}."""
    tasks = {t.name: t for t in task_table.load_tasks(None, ["ejection_fraction", *DEVICES])}
    ef = task_table.task_labels(tasks["ejection_fraction"], reports)
    devices = {d: task_table.task_labels(tasks[d], reports) for d in DEVICES}
    lv_task = lv_size_task()
    lv = task_table.task_labels(lv_task, reports)
    out = []
    for i in range(len(reports)):
        e = float(ef[i]) if np.isfinite(ef[i]) else None
        row = {"ef": e, "ef_band": ef_band(e)}
        row.update({d: "present" if devices[d][i] == 1 else "absent" for d in DEVICES})
        row["lv_size"] = lv_task.value_mapping.get(lv[i]) if np.isfinite(lv[i]) else None
        out.append(row)
    return out


def vote(findings: list[dict], sims: np.ndarray) -> dict:
    """Per finding, the value most of the k neighbours give (ties: the larger summed similarity), with
    support (how many agree), stated (how many give a value) and the agreeing neighbours' mean similarity.
    EF: the median of the stated numbers, support = neighbours within +-5."""
    k, sims = len(findings), np.asarray(sims, np.float64)
    out = {}
    efs = np.asarray([f["ef"] if f["ef"] is not None else np.nan for f in findings], np.float64)
    stated = np.isfinite(efs)
    if stated.any():
        median = float(np.median(efs[stated]))
        agree = stated & (np.abs(efs - median) <= EF_TOLERANCE)
        out["ef"] = {
            "value": median,
            "support": int(agree.sum()),
            "stated": int(stated.sum()),
            "of": k,
            "mean_similarity": float(sims[agree].mean()),
        }
    else:
        out["ef"] = {"value": None, "support": 0, "stated": 0, "of": k, "mean_similarity": None}
    for name in FINDINGS[1:]:
        values = [f[name] for f in findings]
        tally = collections.defaultdict(float)
        counts = collections.Counter(v for v in values if v is not None)
        for v, s in zip(values, sims):
            if v is not None:
                tally[v] += s
        if not counts:
            out[name] = {"value": None, "support": 0, "stated": 0, "of": k, "mean_similarity": None}
            continue
        best = max(counts, key=lambda v: (counts[v], tally[v]))
        agree = np.asarray([v == best for v in values])
        out[name] = {
            "value": best,
            "support": int(counts[best]),
            "stated": int(sum(counts.values())),
            "of": k,
            "mean_similarity": float(sims[agree].mean()),
        }
    return out


def findings_of(bank: Bank) -> list[dict]:
    """The findings of every bank report (computed once per bank)."""
    if getattr(bank, "findings", None) is None:
        bank.findings = report_findings(bank.texts)
    return bank.findings


def compose(bank: Bank, rows: np.ndarray, sims: np.ndarray) -> dict:
    """A report from the retrieved rows: the nearest report, the vote, the neighbours (ids, similarity)."""
    findings = findings_of(bank)
    return {
        "disclaimer": DISCLAIMER,
        "k": int(len(rows)),
        "match": bank.match,
        "nearest_report": {"id": bank.ids[rows[0]], "similarity": float(sims[0]), "text": bank.texts[rows[0]]},
        "findings": vote([findings[r] for r in rows], sims),
        "neighbours": [{"id": bank.ids[r], "similarity": float(s)} for r, s in zip(rows, sims)],
    }


def random_findings(bank: Bank, k: int, rng: np.random.Generator) -> dict:
    """The baseline: the same vote over k reports drawn at random from the bank (similarity 0)."""
    rows = rng.choice(len(bank.ids), size=min(k, len(bank.ids)), replace=False)
    return vote([findings_of(bank)[r] for r in rows], np.zeros(len(rows)))


def render(report: dict, title: str) -> str:
    """The report as text: the disclaimer first, then the voted findings, then the nearest report."""
    f, k = report["findings"], report["k"]

    def line(name, label, fmt=str):
        x = f[name]
        if x["value"] is None:
            return f"  {label}: not stated in any of the {k} reports"
        return (
            f"  {label}: {fmt(x['value'])}  (support {x['support']}/{k}, stated in {x['stated']}, mean "
            f"similarity {x['mean_similarity']:.3f})"
        )

    lines = [
        DISCLAIMER,
        "",
        title,
        f"Findings voted over the {k} nearest reports ({report['match']} match):",
        line("ef", "LV ejection fraction", lambda v: f"about {v:.0f}% (median; support: within +-5)"),
        line("ef_band", "LV systolic function"),
        *[line(d, {"tavr": "aortic valve prosthesis (TAVR)", "mitraclip": "MitraClip"}.get(d, d)) for d in DEVICES],
        line("lv_size", "LV size"),
        "",
        f"Nearest report (similarity {report['nearest_report']['similarity']:.3f}):",
        "  " + report["nearest_report"]["text"],
        "",
    ]
    return "\n".join(lines)


def agreement(predicted: list[dict], truth: list[dict]) -> dict:
    """How often voted findings agree with the truth ({ef, pacemaker/tavr/mitraclip: 0|1 or bool, lv_size}):
    EF within +-5, EF band, each device's accuracy and balanced accuracy (present/absent), LV size accuracy.
    Only the evaluation (tests, the demo) has a truth; the report never reads one."""

    def values(name):
        return [p[name]["value"] for p in predicted]

    pred_ef = np.asarray([np.nan if v is None else v for v in values("ef")], np.float64)
    true_ef = np.asarray([t["ef"] for t in truth], np.float64)
    out = {
        "n": len(truth),
        "ef_within_5": float(np.mean(np.abs(pred_ef - true_ef) <= EF_TOLERANCE)),
        "ef_band_accuracy": float(np.mean([b == ef_band(e) for b, e in zip(values("ef_band"), true_ef)])),
    }
    balanced = []
    for d in DEVICES:
        y = np.asarray([bool(int(t[d])) for t in truth])
        p = np.asarray([v == "present" for v in values(d)])
        out[f"{d}_accuracy"] = float(np.mean(y == p))
        out[f"{d}_balanced_accuracy"] = float(balanced_accuracy_score(y, p)) if len(set(y)) == 2 else None
        if out[f"{d}_balanced_accuracy"] is not None:
            balanced.append(out[f"{d}_balanced_accuracy"])
    out["devices_balanced_accuracy"] = float(np.mean(balanced)) if balanced else None
    out["lv_size_accuracy"] = float(np.mean([v == t["lv_size"] for v, t in zip(values("lv_size"), truth)]))
    return out


def _write_jsonl(path: str, rows) -> None:
    storage.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def report_records(
    embedder,
    bank: Bank,
    data_dir: str,
    split: str,
    *,
    out: str,
    k: int,
    levels,
    frames=None,
    image_size=None,
    baseline: bool = False,
    seed: int = 0,
) -> dict:
    """Reports for every study (and/or video) of a split of records, written under `out` (see the doc)."""

    metas, videos = emb.embed_stream(
        embedder, emb.record_videos(data_dir, split, frames=frames, image_size=image_size), label=split
    )
    if not metas:
        raise ValueError(f"{data_dir}: split {split!r} has no videos")
    order, studies = emb.study_means([m["study_id"] for m in metas], videos)
    patient = {m["study_id"]: m["patient_id"] for m in metas}
    queries = {
        "study": [
            ({"study_id": s, "videos": sum(m["study_id"] == s for m in metas)}, v) for s, v in zip(order, studies)
        ],
        "video": [({"video_id": m["video_id"], "study_id": m["study_id"]}, v) for m, v in zip(metas, videos)],
    }
    by_patient = collections.defaultdict(set)
    for bid, p in zip(bank.ids, bank.patients or ()):
        by_patient[p].add(bid)
    rng = np.random.default_rng(seed)
    summary = {
        "disclaimer": DISCLAIMER,
        "bank": bank.source,
        "bank_reports": len(bank.ids),
        "match": bank.match,
        "k": k,
        "split": split,
        "levels": {},
    }
    for level in levels:
        rows = []
        for query, vector in queries[level]:
            own = {query["study_id"]} | by_patient[patient[query["study_id"]]]  # other patients' reports only
            picked, sims = bank.retrieve(vector, k, own)
            row = {**query, **compose(bank, picked, sims)}
            if baseline:
                row["random_findings"] = random_findings(bank, k, rng)
            rows.append(row)
        _write_jsonl(storage.join(out, f"{level}_reports.jsonl"), rows)
        summary["levels"][level] = len(rows)
        if level == "study":
            storage.write_text(
                storage.join(out, "reports.txt"),
                "\n".join(render(r, f"Study {r['study_id']} ({r['videos']} videos)") for r in rows),
            )
    storage.dump_json(storage.join(out, "summary.json"), summary, indent=1)
    return summary


def report_files(embedder, bank: Bank, path: str, *, out: str, k: int, image_size: int, frames=None) -> dict:
    """The report of one study: a DICOM/AVI/.npy video, or a study directory of .dcm files."""

    files = emb.video_files(path)
    _, study = emb.study_means(
        ["query"] * len(files), emb.embed_files(embedder, files, image_size=image_size, frames=frames)
    )
    picked, sims = bank.retrieve(study[0], k)
    report = {"query": emb.dicom_name(path), "files": len(files), "bank": bank.source, **compose(bank, picked, sims)}
    storage.dump_json(storage.join(out, "report.json"), report, indent=1)
    text = render(report, f"Study {report['query']} ({len(files)} video file(s))")
    storage.write_text(storage.join(out, "report.txt"), text)
    return report


def query_frames(bank_spec: str, max_frames_of) -> int | None:
    """Frames to read of a --video query: as many as the bank's records kept (an index stores it)."""
    meta = storage.join(bank_spec, "index.json")
    if storage.exists(meta):
        return storage.load_json(meta)["model"].get("query_frames")
    return max_frames_of(bank_spec) if storage.isdir(bank_spec) else None
