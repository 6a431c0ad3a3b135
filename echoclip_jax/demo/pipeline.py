"""The demo's stages, from nothing to a trained, evaluated, explained model on the synthetic cohort.

Every stage is the project's own command-line entry point, run as a user would run it (its output teed to
OUT/logs/<stage>.log), so the demo is also the proof that the parts fit: synthetic DICOM cohort ->
data_prep.convert -> train configs/tiny.py -> convert the final checkpoint to safetensors -> evaluate on
held-out patients, per video and per study -> probes on the frozen embeddings -> saliency maps, and the
device prompts' maps scored against the devices' true masks -> preliminary reports by retrieval. A stage
whose output already exists is not redone, so an interrupted demo resumes. Only the demo joins the cohort's
truth to the records (the label CSVs it writes for the probes hold salted ids and stay under OUT/secrets).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from data_prep.options import load_salt
from echoclip_jax.demo import results_table

CONFIG = "configs/tiny.py"
EVAL_TASKS = ("ejection_fraction", "pacemaker", "tavr", "mitraclip")
REPORT_K = 10  # reports retrieved per held-out study or video
SALIENCY_PROMPTS = (
    "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD.",
    "LV EJECTION FRACTION IS 25%.",
)
CAM_STAGE = "0"  # PromptCAM on ConvNeXt's first stage: 16x16 at 64 px (the last stage's 2x2 cannot localise)
SCORE_METHODS = f"promptcam:last,promptcam:{CAM_STAGE},gradient,smoothgrad:4"
SCORE_VIDEOS = 40  # device videos of the test split whose maps are scored
PROBE_LABELS = {
    "video_id": ("view", "ef", "pacemaker", "tavr", "mitraclip"),
    "study_id": ("ef", "pacemaker", "tavr", "mitraclip"),
}
PROBE_FRAMES = 4  # frames per video the probes see (evenly spaced): the train split's embedding dominates their time


class StageFailed(RuntimeError):
    """A stage's command exited with an error; its log names the problem."""


def config_path() -> str:
    """configs/tiny.py, wherever the package is run from (an editable install keeps it in the repo)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, CONFIG)


def run_stage(stage: str, cmd: list[str], log_dir: str) -> float:
    """Run one stage, its output teed to OUT/logs/<stage>.log; stop the demo if it fails."""
    print(f"\n=== {stage}: {' '.join(cmd)}", flush=True)
    start = time.time()
    log_path = os.path.join(log_dir, f"{stage}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if not line.startswith("\r"):
                sys.stdout.write(line)
        rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"stage {stage!r} failed (exit {rc}); see {log_path}")
    return time.time() - start


def run(
    out: str,
    *,
    patients: int = 500,
    seed: int = 0,
    train_steps: int = 1200,
    batch_size: int = 32,
    image_size: int = 64,
    frames: int = 16,
    workers: int = 2,
    cohort_version: int = 2,
) -> dict:
    """Runs every stage not done yet under `out` and returns results.json's content (written there, with
    results.md, the README's table)."""
    out = os.path.abspath(out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    py = sys.executable
    config = config_path()
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
            f.write(hashlib.sha256(f"echoclip-jax synthetic demo, seed {seed}".encode()).hexdigest()[:32])
    timings = {}

    if not os.path.exists(os.path.join(cohort, "truth.csv")):
        timings["synthetic"] = run_stage(
            "synthetic",
            [
                py,
                "-m",
                "data_prep.synthetic",
                "--out",
                cohort,
                "--patients",
                str(patients),
                "--seed",
                str(seed),
                "--small",
                "--workers",
                str(workers),
                "--cohort_version",
                str(cohort_version),
            ],
            logs,
        )
    with open(os.path.join(cohort, "cohort.json")) as f:
        version = int(json.load(f).get("cohort_version", 1))
    if not os.path.exists(os.path.join(data_dir, "dataset_info.json")):
        timings["data_prep"] = run_stage(
            "data_prep",
            [
                py,
                "-m",
                "data_prep.convert",
                "--dicom_dir",
                os.path.join(cohort, "dicom"),
                "--reports",
                os.path.join(cohort, "reports.csv"),
                "--out",
                data_dir,
                "--image_size",
                str(image_size),
                "--frames",
                str(frames),
                "--workers",
                str(workers),
                "--salt_file",
                salt_file,
            ],
            logs,
        )
    overrides = [
        f"--config.data_dir={data_dir}",
        f"--config.total_steps={train_steps}",
        f"--config.batch_size={batch_size}",
        f"--config.seed={seed}",
        f"--config.model.vision.image_size={image_size}",
    ]
    timings["train"] = run_stage(
        "train", [py, "-m", "echoclip_jax.train", f"--config={config}", "--workdir", workdir, *overrides], logs
    )
    if not os.path.exists(export):
        timings["convert"] = run_stage(
            "convert",
            [
                py,
                "-m",
                "echoclip_jax.convert",
                "--src",
                f"orbax:{workdir}",
                "--dst",
                f"safetensors:{export}",
                f"--config={config}",
                *overrides[3:],
            ],
            logs,
        )
    model = [f"--config={config}", *overrides[3:], "--checkpoint", f"safetensors:{export}"]
    timings["evaluate"] = run_stage(
        "evaluate",
        [
            py,
            "-m",
            "echoclip_jax.evaluate",
            *model,
            "--data_dir",
            data_dir,
            "--split",
            "test",
            "--out",
            eval_dir,
            "--tasks",
            ",".join(EVAL_TASKS),
            "--level",
            "both",
        ],
        logs,
    )
    timings["evaluate_weighted"] = run_stage(
        "evaluate_weighted",
        [  # the views weighted by zero-shot relevance
            py,
            "-m",
            "echoclip_jax.evaluate",
            *model,
            "--data_dir",
            data_dir,
            "--split",
            "test",
            "--out",
            weighted_dir,
            "--tasks",
            ",".join(EVAL_TASKS),
            "--level",
            "study",
            "--study_pool",
            "weighted",
        ],
        logs,
    )
    for key, labels in PROBE_LABELS.items():
        labels = [label for label in labels if label != "view" or version >= 2]
        labels_csv = os.path.join(out, "secrets", f"labels_{key}.csv")  # salted ids: kept beside the salt
        if not os.path.exists(labels_csv):
            run_stage(
                f"probe_labels_{key}",
                [
                    py,
                    "-m",
                    "echoclip_jax.probe_labels",
                    "--cohort",
                    cohort,
                    "--salt_file",
                    salt_file,
                    "--key",
                    key,
                    "--out",
                    labels_csv,
                ],
                logs,
            )
        level_dir = os.path.join(probe_dir, key.split("_")[0])
        if not os.path.exists(os.path.join(level_dir, "probe.json")):
            timings[f"probe_{key}"] = run_stage(
                f"probe_{key}",
                [
                    py,
                    "-m",
                    "echoclip_jax.probe",
                    *model,
                    "--data_dir",
                    data_dir,
                    "--labels",
                    labels_csv,
                    "--key",
                    key,
                    "--frames",
                    str(PROBE_FRAMES),
                    *[a for label in labels for a in ("--label", label)],
                    "--out",
                    level_dir,
                ],
                logs,
            )
    if not os.path.exists(saliency_dir):
        timings["interpret"] = run_stage(
            "interpret",
            [
                py,
                "-m",
                "echoclip_jax.interpret",
                *model,
                "--data_dir",
                data_dir,
                "--split",
                "test",
                "--limit",
                "3",
                "--frames",
                "4",
                "--cam_stage",
                CAM_STAGE,
                "--out",
                saliency_dir,
                *[a for prompt in SALIENCY_PROMPTS for a in ("--prompt", prompt)],
            ],
            logs,
        )
    if version >= 2 and not os.path.exists(os.path.join(scores_dir, "scores.json")):
        timings["explain_scores"] = run_stage(
            "explain_scores",
            [
                py,
                "-m",
                "echoclip_jax.interpret",
                *model,
                "--data_dir",
                data_dir,
                "--split",
                "test",
                "--limit",
                str(SCORE_VIDEOS),
                "--frames",
                "4",
                "--score_truth",
                cohort,
                "--salt_file",
                salt_file,
                "--score_methods",
                SCORE_METHODS,
                "--out",
                scores_dir,
            ],
            logs,
        )
    if not os.path.exists(os.path.join(report_dir, "summary.json")):
        timings["report"] = run_stage(
            "report",
            [
                py,
                "-m",
                "echoclip_jax.report",
                *model,
                "--data_dir",
                data_dir,
                "--split",
                "test",
                "--level",
                "both",
                "--baseline",
                "--k",
                str(REPORT_K),
                "--out",
                report_dir,
            ],
            logs,
        )

    with open(os.path.join(eval_dir, "model.json")) as f:
        eval_json = json.load(f)
    salt = load_salt(salt_file=salt_file)
    with open(os.path.join(weighted_dir, "model.json")) as f:
        weighted_json = json.load(f)
    rows = results_table.evaluation_rows(eval_json, results_table.baselines(data_dir), weighted_json)
    for level in ("video", "study"):
        with open(os.path.join(probe_dir, level, "probe.json")) as f:
            rows.update(results_table.probe_rows(json.load(f), level=level))
    if version >= 2:
        with open(os.path.join(scores_dir, "scores.json")) as f:
            rows.update(results_table.saliency_rows(json.load(f)))
    rows.update(results_table.report_rows(report_dir, cohort, salt))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train_log = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in train_log if "loss" in r]
    results = {
        "cohort_version": version,
        "figures": rows,
        "train": {
            "steps": train_steps,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        },
        "num_test_videos": eval_json.get("num_videos"),
        "num_test_studies": eval_json.get("study", {}).get("num_studies"),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "paths": {
            "cohort": cohort,
            "records": data_dir,
            "workdir": workdir,
            "export": export,
            "evaluation": eval_dir,
            "evaluation_weighted_views": weighted_dir,
            "probe": probe_dir,
            "saliency": saliency_dir,
            **({"explain_scores": scores_dir} if version >= 2 else {}),
            "report": report_dir,
            "logs": logs,
        },
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:  # the headline figures, as the README shows them
        f.write(results_table.markdown_table(rows) + "\n")

    return results
