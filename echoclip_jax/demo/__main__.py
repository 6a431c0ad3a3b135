"""The main job: from nothing to a trained, evaluated, explained model on the synthetic cohort.

  python -m echoclip_jax.demo --out demo_out          (what `make demo` runs)

Every stage is the project's own command-line entry point, run as a user would run it, so the demo is also
the proof that the parts fit: synthetic DICOM cohort (version 2: several views per study, reports in
readers' own words) -> data_prep.convert -> train configs/tiny.py -> convert the final checkpoint to
safetensors -> evaluate on held-out patients, per video and per study (views pooled alike, and weighted by
their zero-shot relevance) -> probes on the frozen embeddings
(view, EF, devices) -> saliency maps, and the maps of the device prompts scored against the devices' true
masks -> preliminary reports by retrieval for the held-out studies (echoclip_jax.report), scored against the
cohort's truth beside k random reports. A stage whose output already exists is not redone, so an
interrupted demo resumes. The results table prints every figure beside the baseline it has to beat
(echoclip_jax.demo.results_table); `OUT/results.json` holds them. Only the demo joins the cohort's truth to the
records (the label CSVs it writes for the probes hold salted ids and stay under OUT/secrets).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from data_prep.options import load_salt
from echoclip_jax.demo import results_table as demo_figures
from echoclip_jax.demo.pipeline import (
    CAM_STAGE,
    EVAL_TASKS,
    PROBE_FRAMES,
    PROBE_LABELS,
    REPORT_K,
    SALIENCY_PROMPTS,
    SCORE_METHODS,
    SCORE_VIDEOS,
    _config_path,
    _run,
)


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
    p.add_argument("--cohort_version", type=int, choices=(1, 2), default=2,
                   help="synthetic cohort: 2 (several views per study, reports in readers' own words, device "
                        "masks: the explanation scores need them) or 1 (one view, reports in the zero-shot "
                        "prompts' own sentences: earlier releases' figures)")
    args = p.parse_args(argv)

    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    py = sys.executable
    config = _config_path()
    cohort, data_dir = os.path.join(out, "cohort"), os.path.join(out, "records")
    workdir, export = os.path.join(out, "train"), os.path.join(out, "export", "model.safetensors")
    eval_dir, saliency_dir = os.path.join(out, "eval"), os.path.join(out, "saliency")
    weighted_dir = os.path.join(out, "eval_weighted_views")
    probe_dir, scores_dir = os.path.join(out, "probe"), os.path.join(out, "explain_scores")
    report_dir = os.path.join(out, "report")
    # The salt is a hospital's secret (data_prep.convert hashes every id with it, and the split of patients
    # follows the hashes). The demo's cohort is synthetic, so its salt follows --seed: the same command
    # draws the same split and prints the same figures. Never derive a real export's salt this way.
    salt_file = os.path.join(out, "secrets", "salt")
    if not os.path.exists(salt_file):
        os.makedirs(os.path.dirname(salt_file), exist_ok=True)
        with open(salt_file, "w") as f:
            f.write(hashlib.sha256(f"echoclip-jax synthetic demo, seed {args.seed}".encode()).hexdigest()[:32])
    timings = {}

    if not os.path.exists(os.path.join(cohort, "truth.csv")):
        timings["synthetic"] = _run("synthetic", [
            py, "-m", "data_prep.synthetic", "--out", cohort, "--patients", str(args.patients),
            "--seed", str(args.seed), "--small", "--workers", str(args.workers),
            "--cohort_version", str(args.cohort_version)], logs)
    with open(os.path.join(cohort, "cohort.json")) as f:
        version = int(json.load(f).get("cohort_version", 1))
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
    model = [f"--config={config}", *overrides[3:], "--checkpoint", f"safetensors:{export}"]
    timings["evaluate"] = _run("evaluate", [
        py, "-m", "echoclip_jax.evaluate", *model, "--data_dir", data_dir, "--split", "test", "--out", eval_dir,
        "--tasks", ",".join(EVAL_TASKS), "--level", "both"], logs)
    timings["evaluate_weighted"] = _run("evaluate_weighted", [  # the views weighted by zero-shot relevance
        py, "-m", "echoclip_jax.evaluate", *model, "--data_dir", data_dir, "--split", "test",
        "--out", weighted_dir, "--tasks", ",".join(EVAL_TASKS), "--level", "study", "--study_pool", "weighted"], logs)
    for key, labels in PROBE_LABELS.items():
        labels = [label for label in labels if label != "view" or version >= 2]
        labels_csv = os.path.join(out, "secrets", f"labels_{key}.csv")  # salted ids: kept beside the salt
        if not os.path.exists(labels_csv):
            _run(f"probe_labels_{key}", [py, "-m", "echoclip_jax.probe_labels", "--cohort", cohort,
                                         "--salt_file", salt_file, "--key", key, "--out", labels_csv], logs)
        level_dir = os.path.join(probe_dir, key.split("_")[0])
        if not os.path.exists(os.path.join(level_dir, "probe.json")):
            timings[f"probe_{key}"] = _run(f"probe_{key}", [
                py, "-m", "echoclip_jax.probe", *model, "--data_dir", data_dir, "--labels", labels_csv,
                "--key", key, "--frames", str(PROBE_FRAMES), *[a for label in labels for a in ("--label", label)],
                "--out", level_dir], logs)
    if not os.path.exists(saliency_dir):
        timings["interpret"] = _run("interpret", [
            py, "-m", "echoclip_jax.interpret", *model, "--data_dir", data_dir, "--split", "test", "--limit", "3",
            "--frames", "4", "--cam_stage", CAM_STAGE, "--out", saliency_dir,
            *[a for prompt in SALIENCY_PROMPTS for a in ("--prompt", prompt)]], logs)
    if version >= 2 and not os.path.exists(os.path.join(scores_dir, "scores.json")):
        timings["explain_scores"] = _run("explain_scores", [
            py, "-m", "echoclip_jax.interpret", *model, "--data_dir", data_dir, "--split", "test",
            "--limit", str(SCORE_VIDEOS), "--frames", "4", "--score_truth", cohort, "--salt_file", salt_file,
            "--score_methods", SCORE_METHODS, "--out", scores_dir], logs)
    if not os.path.exists(os.path.join(report_dir, "summary.json")):
        timings["report"] = _run("report", [
            py, "-m", "echoclip_jax.report", *model, "--data_dir", data_dir, "--split", "test", "--level", "both",
            "--baseline", "--k", str(REPORT_K), "--out", report_dir], logs)

    with open(os.path.join(eval_dir, "model.json")) as f:
        eval_json = json.load(f)
    salt = load_salt(salt_file=salt_file)
    with open(os.path.join(weighted_dir, "model.json")) as f:
        weighted_json = json.load(f)
    rows = demo_figures.evaluation_rows(eval_json, demo_figures.baselines(data_dir), weighted_json)
    for level in ("video", "study"):
        with open(os.path.join(probe_dir, level, "probe.json")) as f:
            rows.update(demo_figures.probe_rows(json.load(f), level=level))
    if version >= 2:
        with open(os.path.join(scores_dir, "scores.json")) as f:
            rows.update(demo_figures.saliency_rows(json.load(f)))
    rows.update(demo_figures.report_rows(report_dir, cohort, salt))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train_log = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in train_log if "loss" in r]
    results = {
        "cohort_version": version,
        "figures": rows,
        "train": {"steps": args.train_steps, "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None},
        "num_test_videos": eval_json.get("num_videos"),
        "num_test_studies": eval_json.get("study", {}).get("num_studies"),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "paths": {"cohort": cohort, "records": data_dir, "workdir": workdir, "export": export,
                  "evaluation": eval_dir, "evaluation_weighted_views": weighted_dir, "probe": probe_dir,
                  "saliency": saliency_dir,
                  **({"explain_scores": scores_dir} if version >= 2 else {}), "report": report_dir, "logs": logs},
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:  # the headline figures, as the README shows them
        f.write(demo_figures.markdown_table(rows) + "\n")

    print(f"\n=== results on held-out patients (test split; cohort version {version}) ===")
    print(demo_figures.format_table(rows))
    if losses:
        print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.train_steps} steps")
    print("\nwritten:")
    for k, v in results["paths"].items():
        print(f"  {k:25s} {v}")
    print(f"  {'results':25s} {os.path.join(out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
