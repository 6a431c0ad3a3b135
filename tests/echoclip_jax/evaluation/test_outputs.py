"""What evaluate writes (echoclip_jax.evaluation.outputs) to a bucket: the same files as to local disk."""

import math

import numpy as np

from echoclip_jax.evaluation import outputs
from echoclip_jax.runtime import storage


def _result(step: int, auc: float) -> dict:
    return {
        "name": f"step_{step}",
        "step": step,
        "tasks": {"pacemaker": {"mode": "binary", "auc": auc}, "ef": {"mode": "regression", "mae": 9.0 - step / 10}},
        "retrieval": {"image_to_text": {"mean_rank_fraction": 0.3 - step / 100}},
        "study": {"tasks": {"pacemaker": {"mode": "binary", "auc": auc + 0.05, "brier": math.nan}}},
    }


CURVES = {
    "binary": {"pacemaker": {"labels": [0, 1, 0, 1, 1], "scores": [0.1, 0.8, 0.3, 0.6, 0.2]}},
    "regression": {"ef": {"true": [55.0, 40.0, 62.0], "pred": [50.0, 45.0, 60.0]}},
    "patient_identification": {"labels": [1, 0, 1, 0], "scores": [0.9, 0.2, 0.7, 0.4]},
}


def _write_all(out: str) -> list:
    for step, auc in ((10, 0.7), (20, 0.8)):
        outputs.write_json(storage.join(out, f"step_{step}.json"), _result(step, auc))
    written = [
        outputs.write_summary(out),
        *outputs.plot_checkpoint(out, "step_20", CURVES),
        *outputs.plot_checkpoint(out, "step_20", CURVES, level="study"),
        outputs.plot_metrics_vs_step(out),
        outputs.plot_levels(out, "step_20", _result(20, 0.8)),
    ]
    outputs.write_tensorboard(out, "step_20", 20, _result(20, 0.8))
    return written


def test_evaluation_outputs_on_a_bucket_equal_those_on_local_disk(tmp_path, bucket):
    local, remote = str(tmp_path / "eval"), f"{bucket}/runs/eval"
    written = {root: _write_all(root) for root in (local, remote)}
    assert all(p.startswith(remote + "/") for p in written[remote])
    files = {root: [f for f in storage.files_under(root) if not f.startswith("tensorboard/")] for root in written}
    assert files[remote] == files[local] and "summary.csv" in files[remote]
    assert {f for f in files[remote] if f.startswith("plots/")} == {
        "plots/step_20_roc.png",
        "plots/step_20_ef.png",
        "plots/step_20_study_roc.png",
        "plots/step_20_study_ef.png",
        "plots/metrics_vs_step.png",
        "plots/step_20_levels.png",
    }
    for rel in files[remote]:
        assert storage.read_bytes(storage.join(remote, rel)) == storage.read_bytes(storage.join(local, rel)), rel
    assert outputs.read_results(remote) == outputs.read_results(local)
    assert [r["step"] for r in outputs.read_results(remote)] == [10, 20]
    assert storage.load_json(storage.join(remote, "step_10.json"))["study"]["tasks"]["pacemaker"]["brier"] is None
    events = [f for f in storage.files_under(storage.join(remote, "tensorboard")) if "tfevents" in f]
    assert len(events) == 1 and storage.size(storage.join(remote, "tensorboard", events[0])) > 0
    assert np.isfinite(outputs.flatten(_result(10, 0.7))["tasks/pacemaker/auc"])
