"""The demo's results table: every headline figure beside the baseline it has to beat.

A row is {value, baseline, better: "lower"|"higher", n, beats_baseline} (and, for study-level rows, the same
figure at video level as `video_value`). Zero-shot and retrieval rows come from evaluate's JSON (video level,
and its `study` block), report rows from echoclip_jax.report's outputs joined to the cohort's truth (only the
demo reads the truth), probe rows from echoclip_jax.probe's probe.json, explanation rows from
echoclip_jax.saliency.scores' scores.json (pointing game beside a uniform-in-sector map).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from data_prep import records
from data_prep.plan import salted_hash
from data_prep.synthetic import read_truth
from echoclip_jax.evaluation import task_table
from echoclip_jax.retrieval import report as retrieval_report

DEVICES = ("pacemaker", "tavr", "mitraclip")


def split_reports(data_dir: str, split: str) -> tuple[list[str], list[str], np.ndarray]:
    """(report texts, study ids, EF labels) of one split, read straight from the records (no frames decoded)."""
    reports, studies, ef = [], [], []
    for path in records.list_shards(data_dir, split):
        reader = records.ShardReader(path)
        for i in range(len(reader)):
            ex = records.decode_example(reader[i])
            reports.append(ex["report"][0].decode("utf-8"))
            studies.append(ex["study_id"][0].decode("utf-8"))
            ef.append(ex["ef"][0])
    return reports, studies, np.asarray(ef, np.float64)


def baselines(data_dir: str) -> dict:
    """What a model that learned nothing scores on the test split: the training mean's EF error per video and
    per study (one row per study), and chance for the ranking figures."""
    ef_task = task_table.load_tasks(None, ["ejection_fraction"])[0]
    train_reports, _, train_ef = split_reports(data_dir, "train")
    test_reports, test_studies, test_ef = split_reports(data_dir, "test")
    train_mean = float(np.nanmean(task_table.task_labels(ef_task, train_reports, {"ef": train_ef})))
    y = task_table.task_labels(ef_task, test_reports, {"ef": test_ef})
    _, first = np.unique(test_studies, return_index=True)  # each study's first video (its report's labels)
    y_study = y[first]
    return {
        "ef_mae_predict_train_mean": float(np.nanmean(np.abs(y - train_mean))),
        "study_ef_mae_predict_train_mean": float(np.nanmean(np.abs(y_study - train_mean))),
        "ef_train_mean": train_mean,
        "chance": 0.5,
    }


def _row(value, baseline, better: str, n=None, **extra) -> dict:
    ok = value is not None and not (isinstance(value, float) and math.isnan(value))
    beats = bool(ok and baseline is not None and (value < baseline if better == "lower" else value > baseline))
    return {"value": value, "baseline": baseline, "better": better, "n": n, "beats_baseline": beats, **extra}


def level_rows(block: dict, base: dict, *, prefix: str = "", ef_baseline: float, video: dict | None = None) -> dict:
    """The zero-shot, retrieval and patient-identification rows of one level's block of evaluate's JSON;
    `video`: the video-level block, whose figure each row also carries (`video_value`)."""

    def pick(b, *path):
        for key in path:
            b = (b or {}).get(key)
        return b

    specs = {
        "ejection_fraction_mae": (("tasks", "ejection_fraction", "mae"), ef_baseline, "lower"),
        "ejection_fraction_mae_repository_rule": (
            ("tasks", "ejection_fraction", "mae_repository"),
            ef_baseline,
            "lower",
        ),
    }
    for name in DEVICES:
        specs[f"{name}_auc"] = (("tasks", name, "auc"), base["chance"], "higher")
    specs["retrieval_to_report_mean_rank_fraction"] = (
        ("retrieval", "image_to_text", "mean_rank_fraction"),
        base["chance"],
        "lower",
    )
    specs["patient_identification_auc"] = (("patient_identification", "auc"), base["chance"], "higher")
    rows = {}
    for name, (path, baseline, better) in specs.items():
        if pick(block, *path[:-1]) is None:
            continue
        n = pick(block, *path[:-1], "n") if path[0] == "tasks" else None
        extra = {"video_value": pick(video, *path)} if video is not None else {}
        rows[prefix + name] = _row(pick(block, *path), baseline, better, n, **extra)
    return rows


def evaluation_rows(eval_json: dict, base: dict, weighted: dict | None = None) -> dict:
    """Video-level rows, then study-level rows (`study_*`) when evaluate wrote its study block, and those of
    a second evaluation with the views weighted by their zero-shot relevance (`weighted`: its JSON;
    `study_weighted_*`; its retrieval and patient identification are the mean pool's, so left out)."""
    rows = level_rows(eval_json, base, ef_baseline=base["ef_mae_predict_train_mean"])
    if "study" in eval_json:
        rows.update(
            level_rows(
                eval_json["study"],
                base,
                prefix="study_",
                ef_baseline=base["study_ef_mae_predict_train_mean"],
                video=eval_json,
            )
        )
    if weighted is not None and "study" in weighted:
        rows.update(
            {
                k: v
                for k, v in level_rows(
                    weighted["study"],
                    base,
                    prefix="study_weighted_",
                    ef_baseline=base["study_ef_mae_predict_train_mean"],
                    video=eval_json,
                ).items()
                if "retrieval" not in k and "patient_identification" not in k
            }
        )
    return rows


def report_rows(report_dir: str, cohort: str, salt: bytes) -> dict:
    """Agreement of the retrieval reports' voted findings with the cohort's truth (truth.csv, joined by the
    salted study id), beside the same vote over k random bank reports."""

    truth = {}
    for r in read_truth(cohort):
        truth.setdefault(
            salted_hash(salt, "study", r["StudyInstanceUID"]),
            {"ef": float(r["ef"]), "lv_size": r["lv_size"], **{d: int(r[d]) for d in retrieval_report.DEVICES}},
        )
    rows = {}
    for level, keys in (
        ("study", ("ef_within_5", "ef_band_accuracy", "devices_balanced_accuracy", "lv_size_accuracy")),
        ("video", ("ef_within_5", "devices_balanced_accuracy")),
    ):
        with open(os.path.join(report_dir, f"{level}_reports.jsonl")) as f:
            found = [json.loads(line) for line in f]
        true = [truth[x["study_id"]] for x in found]
        got = retrieval_report.agreement([x["findings"] for x in found], true)
        chance = retrieval_report.agreement([x["random_findings"] for x in found], true)
        for key in keys:
            rows[f"report_{level}_{key}"] = _row(got[key], chance[key], "higher", got["n"])
    return rows


PROBE_FIGURES = {"classification": ("accuracy", "higher"), "regression": ("mae", "lower")}


def probe_rows(probe_json: dict, *, level: str) -> dict:
    """probe_<level>_<probe>_<label>_<metric> per label and probe, beside the majority class or mean; binary
    labels by balanced accuracy (the majority class scores 0.5), so a rare device is not hidden by its
    prevalence."""
    rows = {}
    for label, res in probe_json["labels"].items():
        if "error" in res:
            continue
        m, better = PROBE_FIGURES[res["task"]]
        if res["task"] == "classification" and len(res["baseline"].get("confusion_matrix", {}).get("labels", [])) == 2:
            m = "balanced_accuracy"
        for probe, r in res["probes"].items():
            rows[f"probe_{level}_{probe}_{label}_{m}"] = _row(
                r["metrics"][m], res["baseline"][m], better, r["metrics"].get("n")
            )
    return rows


def saliency_rows(scores: dict) -> dict:
    """Pointing game and mass share of each map method over all device videos, beside a uniform-in-sector
    map's (the centre map's as `centre`)."""
    rows = {}
    methods = scores["methods"]
    uniform, centre = methods["uniform"]["all"], methods["centre"]["all"]
    for label, per in methods.items():
        if label in ("uniform", "centre"):
            continue
        for m in ("pointing_game", "mass_share"):
            rows[f"explain_{label}_{m}"] = _row(
                per["all"][m], uniform[m], "higher", per["all"]["frames"], centre=centre[m]
            )
    return rows


def format_table(rows: dict) -> str:
    lines = [f"{'figure':52s} {'value':>9s} {'baseline':>9s} {'video':>7s}  beats"]
    for name, row in rows.items():
        v, b, vv = row["value"], row["baseline"], row.get("video_value")
        lines.append(
            f"{name:52s} {'n/a' if v is None else f'{v:9.3f}':>9s} "
            f"{'n/a' if b is None else f'{b:9.3f}':>9s} {'' if vv is None else f'{vv:7.3f}':>7s}  "
            f"{'yes' if row['beats_baseline'] else 'NO'}"
        )
    return "\n".join(lines)


HEADLINES = (  # (label, rows joined with " / "): the README's table, from results.json
    ("zero-shot EF MAE (paper's rule)", ("ejection_fraction_mae",)),
    ("zero-shot pacemaker / TAVR / MitraClip AUC", tuple(f"{d}_auc" for d in DEVICES)),
    ("retrieval to report, mean rank fraction", ("retrieval_to_report_mean_rank_fraction",)),
    ("patient identification AUC", ("patient_identification_auc",)),
    (
        "probe, view accuracy (linear / attentive)",
        ("probe_video_linear_view_accuracy", "probe_video_attentive_view_accuracy"),
    ),
    ("probe, EF MAE (linear / attentive)", ("probe_video_linear_ef_mae", "probe_video_attentive_ef_mae")),
    (
        "probe, pacemaker / TAVR / MitraClip balanced accuracy (linear)",
        tuple(f"probe_video_linear_{d}_balanced_accuracy" for d in DEVICES),
    ),
    (
        "explanation maps, pointing game: PromptCAM last stage / first stage / gradient",
        ("explain_promptcam:last_pointing_game", "explain_promptcam:0_pointing_game", "explain_gradient_pointing_game"),
    ),
    (
        "preliminary report by retrieval: EF within ±5 / EF band",
        ("report_study_ef_within_5", "report_study_ef_band_accuracy"),
    ),
    (
        "preliminary report: devices (mean balanced accuracy) / LV size",
        ("report_study_devices_balanced_accuracy", "report_study_lv_size_accuracy"),
    ),
)
STUDY_ROWS = {
    "ejection_fraction_mae",
    "pacemaker_auc",
    "tavr_auc",
    "mitraclip_auc",
    "retrieval_to_report_mean_rank_fraction",
    "patient_identification_auc",
}


def markdown_table(rows: dict) -> str:
    """The headline figures as a Markdown table: per video, per study (where the figure has a study level;
    probes: the study-keyed probe; reports are per study), per study with the views weighted (zero-shot
    tasks) and the baselines."""

    def fmt(names, key="value", prefix=""):
        got = [rows.get(prefix + n, {}).get(key) for n in names]
        return " / ".join("-" if v is None else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" for v in got)

    def study_names(names):
        if all(n in STUDY_ROWS for n in names):
            return "study_", names
        if all(n.startswith("probe_video_") for n in names):
            return "", [n.replace("probe_video_", "probe_study_") for n in names]
        if all(n.startswith("report_study_") for n in names):
            return "", names
        return None, names

    lines = [
        "| figure | per video | per study | per study, views weighted | baseline |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, names in HEADLINES:
        if not any(n in rows for n in names):
            continue
        prefix, s_names = study_names(names)
        video = "" if names[0].startswith("report_study_") else fmt(names)
        study = fmt(s_names, prefix=prefix) if prefix is not None and any(prefix + n in rows for n in s_names) else ""
        weighted = (
            fmt(names, prefix="study_weighted_")
            if prefix == "study_" and any("study_weighted_" + n in rows for n in names)
            else ""
        )
        baseline = fmt(names, "baseline")
        present = [n for n in names if n in rows]
        if all("centre" in rows[n] for n in present):  # maps: one uniform map and one centre map for all
            baseline = f"{fmt(present[:1], 'baseline')} random sector pixel; {fmt(present[:1], 'centre')} centre map"
        lines.append(f"| {label} | {video} | {study} | {weighted} | {baseline} |")
    return "\n".join(lines)
