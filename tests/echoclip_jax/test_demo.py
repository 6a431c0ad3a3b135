"""The main job learns: `make demo`'s pipeline, with its default settings, beats every baseline."""
import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO


@pytest.mark.slow
def test_demo_learns_on_held_out_patients(tmp_path):
    out = tmp_path / "demo_out"
    # As `make demo` runs it: its own process, on the machine's real device (not the tests' 8 simulated ones).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "echoclip_jax.demo", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    figures = results["figures"]

    ef = figures["ejection_fraction_mae"]
    assert ef["value"] < 0.6 * ef["baseline"], ef  # clearly below predicting the training mean
    for device in ("pacemaker", "tavr", "mitraclip"):
        row = figures[f"{device}_auc"]
        assert row["n"] and row["value"] > 0.7, (device, row)  # well above chance on unseen patients
    assert figures["retrieval_video_to_report_mean_rank_fraction"]["value"] < 0.4
    assert figures["patient_identification_auc"]["value"] > 0.6
    # The retrieval-based preliminary report agrees with the truth far more often than random reports do.
    ef5 = figures["report_study_ef_within_5"]
    assert ef5["value"] > max(2 * ef5["baseline"], 0.5), ef5
    assert figures["report_study_devices_balanced_accuracy"]["value"] > 0.8
    assert results["train"]["last_loss"] < results["train"]["first_loss"]

    # Everything the demo promises to write is there.
    for path in results["paths"].values():
        assert os.path.exists(path), path
    assert list((out / "saliency").rglob("*.png")), "no saliency overlays written"
