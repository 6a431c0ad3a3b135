"""The demo's stages: every one is the project's own command-line entry point, run as a user would run it,
its output teed to OUT/logs/<stage>.log.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

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
PROBE_LABELS = {"video_id": ("view", "ef", "pacemaker", "tavr", "mitraclip"),
                "study_id": ("ef", "pacemaker", "tavr", "mitraclip")}
PROBE_FRAMES = 4  # frames per video the probes see (evenly spaced): the train split's embedding dominates their time


def _config_path() -> str:
    """configs/tiny.py, wherever the package is run from (an editable install keeps it in the repo)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, CONFIG)


def _run(stage: str, cmd: list[str], log_dir: str) -> float:
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
        sys.exit(f"demo: stage {stage!r} failed (exit {rc}); see {log_path}")
    return time.time() - start
