"""The main job: from nothing to a trained, evaluated, explained model on the synthetic cohort.

  python -m echoclip_jax.demo --out demo_out          (what `make demo` runs)

Every stage is the project's own command-line entry point, run as a user would run it, so the demo
is also the proof that the parts fit: synthetic DICOM cohort -> data_prep.convert -> train
configs/tiny.py -> convert the final checkpoint to safetensors -> evaluate on held-out patients ->
saliency maps -> preliminary reports by retrieval for the held-out studies (echoclip_jax.report), scored
against the cohort's truth beside k random reports. A stage whose output already exists is not redone, so an interrupted demo resumes.
The results table prints every figure beside the baseline it has to beat; `OUT/results.json` holds them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import subprocess
import sys
import time

import numpy as np

from data_prep import records
from echoclip_jax import zero_shot as zs

CONFIG = "configs/tiny.py"
EVAL_TASKS = ("ejection_fraction", "pacemaker", "tavr", "mitraclip")
REPORT_K = 10  # reports retrieved per held-out study or video
SALIENCY_PROMPTS = (
    "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD.",
    "LV EJECTION FRACTION IS 25%.",
)


def _config_path() -> str:
    """configs/tiny.py, wherever the package is run from (an editable install keeps it in the repo)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, CONFIG)


_ABSL_LINE = re.compile(r"^I\d{4} [\d:.]+\s+\d+ (\w+)\.py:\d+\]")
_OWN_MODULES = {"train", "evaluate", "convert", "interpret", "checkpoint", "data", "embed"}


def _library_info(line: str) -> bool:
    """An INFO line logged by a library (Orbax's save/restore chatter): kept in the log file, not shown."""
    m = _ABSL_LINE.match(line)
    return bool(m) and m.group(1) not in _OWN_MODULES


def _run(stage: str, cmd: list[str], log_dir: str) -> float:
    """Run one stage, its output teed to OUT/logs/<stage>.log; stop the demo if it fails."""
    print(f"\n=== {stage}: {' '.join(cmd)}", flush=True)
    start = time.time()
    log_path = os.path.join(log_dir, f"{stage}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if not line.startswith("\r") and not _library_info(line):
                sys.stdout.write(line)
        rc = proc.wait()
    if rc != 0:
        sys.exit(f"demo: stage {stage!r} failed (exit {rc}); see {log_path}")
    return time.time() - start


def split_reports(data_dir: str, split: str) -> tuple[list[str], np.ndarray]:
    """Report texts and EF labels of one split, read straight from the records (no frames decoded)."""
    reports, ef = [], []
    for path in records.list_shards(data_dir, split):
        reader = records.ShardReader(path)
        for i in range(len(reader)):
            ex = records.decode_example(reader[i])
            reports.append(ex["report"][0].decode("utf-8"))
            ef.append(ex["ef"][0])
    return reports, np.asarray(ef, np.float64)


def baselines(data_dir: str) -> dict:
    """What a model that learned nothing scores on the test split."""
    tasks = {t.name: t for t in zs.load_tasks(None, ["ejection_fraction"])}
    ef_task = tasks["ejection_fraction"]
    train_reports, train_ef = split_reports(data_dir, "train")
    test_reports, test_ef = split_reports(data_dir, "test")
    y_train = zs.task_labels(ef_task, train_reports, {"ef": train_ef})
    y_test = zs.task_labels(ef_task, test_reports, {"ef": test_ef})
    train_mean = float(np.nanmean(y_train))
    known = np.isfinite(y_test)
    return {
        "ef_mae_predict_train_mean": float(np.mean(np.abs(y_test[known] - train_mean))),
        "ef_train_mean": train_mean,
        "auc_chance": 0.5,
        "retrieval_mean_rank_fraction_chance": 0.5,
        "patient_identification_auc_chance": 0.5,
    }


def summarise(eval_json: dict, base: dict) -> dict:
    """Every headline figure beside its baseline, with whether it beats it."""
    tasks = eval_json["tasks"]
    rows = {}
    ef = tasks["ejection_fraction"]
    rows["ejection_fraction_mae"] = {"value": ef.get("mae"), "baseline": base["ef_mae_predict_train_mean"],
                                     "better": "lower", "n": ef.get("n")}
    rows["ejection_fraction_mae_repository_rule"] = {  # EchoCLIP's released code: ranks averaged over frames
        "value": ef.get("mae_repository"), "baseline": base["ef_mae_predict_train_mean"], "better": "lower",
        "n": ef.get("n")}
    for name in EVAL_TASKS[1:]:
        t = tasks[name]
        rows[f"{name}_auc"] = {"value": t.get("auc"), "baseline": base["auc_chance"], "better": "higher",
                               "n": t.get("n")}
    if "retrieval" in eval_json:
        r = eval_json["retrieval"]["image_to_text"]
        rows["retrieval_video_to_report_mean_rank_fraction"] = {
            "value": r.get("mean_rank_fraction"), "baseline": base["retrieval_mean_rank_fraction_chance"],
            "better": "lower", "n": r.get("n")}
    pid = eval_json["patient_identification"]
    rows["patient_identification_auc"] = {"value": pid.get("auc"),
                                          "baseline": base["patient_identification_auc_chance"],
                                          "better": "higher", "n": pid.get("n_pairs", pid.get("n"))}
    for row in rows.values():
        v, b = row["value"], row["baseline"]
        ok = v is not None and not (isinstance(v, float) and math.isnan(v))
        row["beats_baseline"] = bool(ok and (v < b if row["better"] == "lower" else v > b))
    return rows


def report_rows(report_dir: str, cohort: str, salt_file: str) -> dict:
    """Agreement of the retrieval reports' voted findings with the cohort's truth (truth.csv, joined by the
    salted study id; only the demo reads it), beside the same vote over k random bank reports."""
    from data_prep.plan import salted_hash
    from data_prep.synthetic import read_truth
    from echoclip_jax import report

    with open(salt_file, "rb") as f:
        salt = f.read().strip()
    truth = {}
    for r in read_truth(cohort):
        truth.setdefault(salted_hash(salt, "study", r["StudyInstanceUID"]),
                         {"ef": float(r["ef"]), "lv_size": r["lv_size"], **{d: int(r[d]) for d in report.DEVICES}})
    rows = {}
    for level, keys in (("study", ("ef_within_5", "ef_band_accuracy", "devices_balanced_accuracy", "lv_size_accuracy")),
                        ("video", ("ef_within_5", "devices_balanced_accuracy"))):
        with open(os.path.join(report_dir, f"{level}_reports.jsonl")) as f:
            found = [json.loads(line) for line in f]
        true = [truth[x["study_id"]] for x in found]
        got = report.agreement([x["findings"] for x in found], true)
        chance = report.agreement([x["random_findings"] for x in found], true)
        for key in keys:
            v, b = got[key], chance[key]
            rows[f"report_{level}_{key}"] = {"value": v, "baseline": b, "better": "higher", "n": got["n"],
                                             "beats_baseline": bool(v is not None and b is not None and v > b)}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="everything is written under this directory")
    p.add_argument("--patients", type=int, default=500, help="synthetic patients (several studies each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_steps", type=int, default=1200, help="steps of configs/tiny.py")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--frames", type=int, default=16, help="frames kept per video by data_prep")
    p.add_argument("--workers", type=int, default=2, help="data_prep processes")
    p.add_argument("--cohort_version", type=int, choices=(1, 2), default=1,
                   help="synthetic cohort: 1 (one view, prompt-worded reports) or 2 (several views per study, "
                        "reports in readers' own words)")
    args = p.parse_args(argv)

    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    py = sys.executable
    config = _config_path()
    cohort, data_dir = os.path.join(out, "cohort"), os.path.join(out, "records")
    workdir, export = os.path.join(out, "train"), os.path.join(out, "export", "model.safetensors")
    eval_dir, saliency_dir = os.path.join(out, "eval"), os.path.join(out, "saliency")
    report_dir = os.path.join(out, "report")
    # The salt is the hospital's secret; the demo makes one for its synthetic cohort.
    salt_file = os.path.join(out, "secrets", "salt")
    if not os.path.exists(salt_file):
        os.makedirs(os.path.dirname(salt_file), exist_ok=True)
        with open(salt_file, "w") as f:
            f.write(secrets.token_hex(16))
    timings = {}

    if not os.path.exists(os.path.join(cohort, "truth.csv")):
        timings["synthetic"] = _run("synthetic", [
            py, "-m", "data_prep.synthetic", "--out", cohort, "--patients", str(args.patients),
            "--seed", str(args.seed), "--small", "--workers", str(args.workers),
            "--cohort_version", str(args.cohort_version)], logs)
    if not os.path.exists(os.path.join(data_dir, "dataset_info.json")):
        timings["data_prep"] = _run("data_prep", [
            py, "-m", "data_prep.convert", "--dicom_dir", os.path.join(cohort, "dicom"),
            "--reports", os.path.join(cohort, "reports.csv"), "--out", data_dir,
            "--image_size", str(args.image_size), "--frames", str(args.frames),
            "--workers", str(args.workers), "--salt_file", salt_file], logs)
    overrides = [f"--config.data_dir={data_dir}", f"--config.total_steps={args.train_steps}",
                 f"--config.batch_size={args.batch_size}", f"--config.seed={args.seed}",
                 f"--config.model.vision.image_size={args.image_size}"]
    timings["train"] = _run("train", [py, "-m", "echoclip_jax.train", f"--config={config}",
                                      "--workdir", workdir, *overrides], logs)
    if not os.path.exists(export):
        timings["convert"] = _run("convert", [
            py, "-m", "echoclip_jax.convert", "--src", f"orbax:{workdir}", "--dst", f"safetensors:{export}",
            f"--config={config}", *overrides[3:]], logs)
    checkpoint = f"safetensors:{export}"
    timings["evaluate"] = _run("evaluate", [
        py, "-m", "echoclip_jax.evaluate", f"--config={config}", *overrides[3:], "--checkpoint", checkpoint,
        "--data_dir", data_dir, "--split", "test", "--out", eval_dir, "--tasks", ",".join(EVAL_TASKS)], logs)
    if not os.path.exists(os.path.join(saliency_dir)):
        timings["interpret"] = _run("interpret", [
            py, "-m", "echoclip_jax.interpret", f"--config={config}", *overrides[3:], "--checkpoint", checkpoint,
            "--data_dir", data_dir, "--split", "test", "--limit", "3", "--frames", "4", "--out", saliency_dir,
            *[a for prompt in SALIENCY_PROMPTS for a in ("--prompt", prompt)]], logs)
    if not os.path.exists(os.path.join(report_dir, "summary.json")):
        timings["report"] = _run("report", [
            py, "-m", "echoclip_jax.report", f"--config={config}", *overrides[3:], "--checkpoint", checkpoint,
            "--data_dir", data_dir, "--split", "test", "--level", "both", "--baseline", "--k", str(REPORT_K),
            "--out", report_dir], logs)

    eval_files = sorted(f for f in os.listdir(eval_dir) if f.endswith(".json"))
    with open(os.path.join(eval_dir, eval_files[-1])) as f:
        eval_json = json.load(f)
    rows = summarise(eval_json, baselines(data_dir))
    rows.update(report_rows(report_dir, cohort, salt_file))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train_log = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in train_log if "loss" in r]
    results = {
        "figures": rows,
        "train": {"steps": args.train_steps, "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None},
        "num_test_videos": eval_json.get("num_videos"),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "paths": {"cohort": cohort, "records": data_dir, "workdir": workdir, "export": export,
                  "evaluation": eval_dir, "saliency": saliency_dir, "report": report_dir, "logs": logs},
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    print("\n=== results on held-out patients (test split) ===")
    print(f"{'figure':48s} {'value':>9s} {'baseline':>9s}  beats")
    for name, row in rows.items():
        v = row["value"]
        v_str = "n/a" if v is None else f"{v:9.3f}"
        print(f"{name:48s} {v_str:>9s} {row['baseline']:9.3f}  {'yes' if row['beats_baseline'] else 'NO'}")
    if losses:
        print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.train_steps} steps")
    print("\nwritten:")
    for k, v in results["paths"].items():
        print(f"  {k:11s} {v}")
    print(f"  {'results':11s} {os.path.join(out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
