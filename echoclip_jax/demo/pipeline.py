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
from types import SimpleNamespace

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


def flags(**values) -> list[str]:
    """Command-line flags: `--name value` each; True gives a bare `--name`, a list or tuple the flag repeated."""
    out = []
    for name, value in values.items():
        if value is True:
            out.append(f"--{name}")
        else:
            for v in value if isinstance(value, (list, tuple)) else (value,):
                out += [f"--{name}", str(v)]
    return out


def run_stage(stage: str, module: str, argv: list[str], log_dir: str) -> float:
    """Runs `python -m module argv`, its output teed to OUT/logs/<stage>.log; stops the demo if it fails."""
    cmd = [sys.executable, "-m", module, *argv]
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


# where each stage writes, under the demo's OUT
LAYOUT = {
    "logs": "logs",
    "cohort": "cohort",
    "records": "records",
    "workdir": "train",
    "export": os.path.join("export", "model.safetensors"),
    "evaluation": "eval",
    "evaluation_weighted_views": "eval_weighted_views",
    "probe": "probe",
    "saliency": "saliency",
    "explain_scores": "explain_scores",
    "report": "report",
    "salt": os.path.join("secrets", "salt"),
}


def _salt_file(p: SimpleNamespace, seed: int) -> str:
    """The salt is a hospital's secret (data_prep.convert hashes every id with it, and the split of patients
    follows the hashes). The demo's cohort is synthetic, so its salt follows the seed: the same command draws
    the same split and prints the same figures. Never derive a real export's salt this way."""
    if not os.path.exists(p.salt):
        os.makedirs(os.path.dirname(p.salt), exist_ok=True)
        with open(p.salt, "w") as f:
            f.write(hashlib.sha256(f"echoclip-jax synthetic demo, seed {seed}".encode()).hexdigest()[:32])
    return p.salt


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
    p = SimpleNamespace(**{name: os.path.join(out, rel) for name, rel in LAYOUT.items()})
    os.makedirs(p.logs, exist_ok=True)
    salt_file = _salt_file(p, seed)
    timings = {}

    def stage(name: str, module: str, argv: list[str]) -> None:
        timings[name] = run_stage(name, module, argv, p.logs)

    if not os.path.exists(os.path.join(p.cohort, "truth.csv")):
        stage(
            "synthetic",
            "data_prep.synthetic",
            flags(
                out=p.cohort, patients=patients, seed=seed, small=True, workers=workers, cohort_version=cohort_version
            ),
        )
    with open(os.path.join(p.cohort, "cohort.json")) as f:
        version = int(json.load(f).get("cohort_version", 1))
    if not os.path.exists(os.path.join(p.records, "dataset_info.json")):
        stage(
            "data_prep",
            "data_prep.convert",
            flags(
                dicom_dir=os.path.join(p.cohort, "dicom"),
                reports=os.path.join(p.cohort, "reports.csv"),
                out=p.records,
                image_size=image_size,
                frames=frames,
                workers=workers,
                salt_file=salt_file,
            ),
        )
    # the settings of the model, for every command that loads it; training adds its data and schedule
    settings = [f"--config={config_path()}", f"--config.seed={seed}", f"--config.model.vision.image_size={image_size}"]
    schedule = [f"--config.data_dir={p.records}", f"--config.total_steps={train_steps}"]
    stage(
        "train",
        "echoclip_jax.train",
        [*settings, *schedule, f"--config.batch_size={batch_size}", *flags(workdir=p.workdir)],
    )
    if not os.path.exists(p.export):
        stage(
            "convert",
            "echoclip_jax.convert",
            [*settings, *flags(src=f"orbax:{p.workdir}", dst=f"safetensors:{p.export}")],
        )
    model = [*settings, *flags(checkpoint=f"safetensors:{p.export}")]
    on_test = [*model, *flags(data_dir=p.records, split="test")]
    tasks = ",".join(EVAL_TASKS)
    stage("evaluate", "echoclip_jax.evaluate", [*on_test, *flags(out=p.evaluation, tasks=tasks, level="both")])
    stage(
        "evaluate_weighted",
        "echoclip_jax.evaluate",  # the views weighted by zero-shot relevance
        [*on_test, *flags(out=p.evaluation_weighted_views, tasks=tasks, level="study", study_pool="weighted")],
    )
    for key, labels in PROBE_LABELS.items():
        labels = [label for label in labels if label != "view" or version >= 2]
        labels_csv = os.path.join(out, "secrets", f"labels_{key}.csv")  # salted ids: kept beside the salt
        if not os.path.exists(labels_csv):
            run_stage(
                f"probe_labels_{key}",
                "echoclip_jax.probe_labels",
                flags(cohort=p.cohort, salt_file=salt_file, key=key, out=labels_csv),
                p.logs,
            )
        level_dir = os.path.join(p.probe, key.split("_")[0])
        if not os.path.exists(os.path.join(level_dir, "probe.json")):
            stage(
                f"probe_{key}",
                "echoclip_jax.probe",
                [
                    *model,
                    *flags(
                        data_dir=p.records, labels=labels_csv, key=key, frames=PROBE_FRAMES, label=labels, out=level_dir
                    ),
                ],
            )
    if not os.path.exists(p.saliency):
        stage(
            "interpret",
            "echoclip_jax.interpret",
            [*on_test, *flags(limit=3, frames=4, cam_stage=CAM_STAGE, out=p.saliency, prompt=SALIENCY_PROMPTS)],
        )
    if version >= 2 and not os.path.exists(os.path.join(p.explain_scores, "scores.json")):
        stage(
            "explain_scores",
            "echoclip_jax.interpret",
            [
                *on_test,
                *flags(
                    limit=SCORE_VIDEOS,
                    frames=4,
                    score_truth=p.cohort,
                    salt_file=salt_file,
                    score_methods=SCORE_METHODS,
                    out=p.explain_scores,
                ),
            ],
        )
    if not os.path.exists(os.path.join(p.report, "summary.json")):
        stage(
            "report", "echoclip_jax.report", [*on_test, *flags(level="both", baseline=True, k=REPORT_K, out=p.report)]
        )
    return _results(p, version, timings, train_steps, load_salt(salt_file=salt_file), out)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _results(p: SimpleNamespace, version: int, timings: dict, train_steps: int, salt: bytes, out: str) -> dict:
    """Every figure beside its baseline (`results_table`), written to OUT/results.json and OUT/results.md."""
    eval_json = _read_json(os.path.join(p.evaluation, "model.json"))
    weighted_json = _read_json(os.path.join(p.evaluation_weighted_views, "model.json"))
    rows = results_table.evaluation_rows(eval_json, results_table.baselines(p.records), weighted_json)
    for level in ("video", "study"):
        rows.update(results_table.probe_rows(_read_json(os.path.join(p.probe, level, "probe.json")), level=level))
    if version >= 2:
        rows.update(results_table.saliency_rows(_read_json(os.path.join(p.explain_scores, "scores.json"))))
    rows.update(results_table.report_rows(p.report, p.cohort, salt))
    with open(os.path.join(p.workdir, "metrics.jsonl")) as f:
        losses = [row["loss"] for row in map(json.loads, filter(str.strip, f)) if "loss" in row]
    listed = [
        "cohort",
        "records",
        "workdir",
        "export",
        "evaluation",
        "evaluation_weighted_views",
        "probe",
        "saliency",
        *(["explain_scores"] if version >= 2 else []),
        "report",
        "logs",
    ]
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
        "paths": {k: vars(p)[k] for k in listed},
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:  # the headline figures, as the README shows them
        f.write(results_table.markdown_table(rows) + "\n")
    return results
