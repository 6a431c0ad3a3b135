"""The demo's results table: each figure beside the right baseline, study rows beside their video figure."""

import pytest

from echoclip_jax.demo import results_table as df

BASE = {"ef_mae_predict_train_mean": 15.0, "study_ef_mae_predict_train_mean": 16.0, "chance": 0.5}


def level(ef_mae, auc, rank):
    return {
        "tasks": {
            "ejection_fraction": {"mae": ef_mae, "mae_repository": ef_mae + 1, "n": 10},
            **{d: {"auc": auc, "n": 10} for d in df.DEVICES},
        },
        "retrieval": {"image_to_text": {"mean_rank_fraction": rank}},
        "patient_identification": {"auc": 0.7},
    }


def test_evaluation_rows_video_and_study():
    result = {**level(9.0, 0.6, 0.1), "study": level(17.0, 0.4, 0.05)}
    rows = df.evaluation_rows(result, BASE)
    assert rows["ejection_fraction_mae"] == {
        "value": 9.0,
        "baseline": 15.0,
        "better": "lower",
        "n": 10,
        "beats_baseline": True,
    }
    study = rows["study_ejection_fraction_mae"]
    assert (study["baseline"], study["video_value"], study["beats_baseline"]) == (16.0, 9.0, False)
    assert rows["study_pacemaker_auc"]["beats_baseline"] is False and rows["pacemaker_auc"]["beats_baseline"]
    assert rows["study_retrieval_to_report_mean_rank_fraction"]["video_value"] == 0.1
    assert "study_tavr_auc" in rows and len(rows) == 14
    assert df._row(None, 1.0, "lower")["beats_baseline"] is False
    assert df._row(float("nan"), 1.0, "lower")["beats_baseline"] is False


def test_probe_rows_binary_labels_by_balanced_accuracy():
    cm2 = {"labels": ["0", "1"]}
    probe = {
        "labels": {
            "view": {
                "task": "classification",
                "baseline": {"accuracy": 0.2, "balanced_accuracy": 0.2, "confusion_matrix": {"labels": list("abcde")}},
                "probes": {"linear": {"metrics": {"accuracy": 0.9, "balanced_accuracy": 0.8, "n": 5}}},
            },
            "pacemaker": {
                "task": "classification",
                "baseline": {"accuracy": 0.8, "balanced_accuracy": 0.5, "confusion_matrix": cm2},
                "probes": {"linear": {"metrics": {"accuracy": 0.7, "balanced_accuracy": 0.75, "n": 5}}},
            },
            "ef": {
                "task": "regression",
                "baseline": {"mae": 15.0},
                "probes": {"attentive": {"metrics": {"mae": 4.0, "n": 5}}},
            },
            "broken": {"task": "regression", "error": "one training item"},
        }
    }
    rows = df.probe_rows(probe, level="video")
    assert set(rows) == {
        "probe_video_linear_view_accuracy",
        "probe_video_linear_pacemaker_balanced_accuracy",
        "probe_video_attentive_ef_mae",
    }
    assert rows["probe_video_linear_pacemaker_balanced_accuracy"]["baseline"] == 0.5
    assert rows["probe_video_attentive_ef_mae"]["beats_baseline"]


def test_saliency_rows_beside_the_uniform_map():
    def pooled(p, m):
        return {"all": {"pointing_game": p, "mass_share": m, "frames": 12, "videos": 3}}

    scores = {"methods": {"promptcam:0": pooled(0.3, 0.04), "uniform": pooled(0.1, 0.02), "centre": pooled(0.2, 0.03)}}
    rows = df.saliency_rows(scores)
    assert set(rows) == {"explain_promptcam:0_pointing_game", "explain_promptcam:0_mass_share"}
    row = rows["explain_promptcam:0_pointing_game"]
    assert (row["value"], row["baseline"], row["centre"], row["n"]) == (0.3, 0.1, 0.2, 12)
    assert row["beats_baseline"] and "pointing_game" in df.format_table(rows)
    line = next(x for x in df.markdown_table(rows).splitlines() if x.startswith("| explanation maps"))
    assert line.endswith("| 0.10 random sector pixel; 0.20 centre map |")
    with pytest.raises(KeyError):
        df.saliency_rows({"methods": {"promptcam:0": pooled(0.3, 0.04)}})


def test_markdown_table_puts_study_figures_beside_video_figures():
    result = {**level(9.0, 0.6, 0.1), "study": level(8.0, 0.65, 0.05)}
    rows = df.evaluation_rows(result, BASE)
    table = df.markdown_table(rows).splitlines()
    assert table[0] == "| figure | per video | per study | per study, views weighted | baseline |"
    assert "| zero-shot EF MAE (paper's rule) | 9.00 | 8.00 |  | 15.0 |" in table
    assert (
        "| zero-shot pacemaker / TAVR / MitraClip AUC | 0.60 / 0.60 / 0.60 | 0.65 / 0.65 / 0.65 |  | "
        "0.50 / 0.50 / 0.50 |"
    ) in table
    rows = df.evaluation_rows(result, BASE, weighted={"study": level(7.0, 0.7, 0.5)})
    assert rows["study_weighted_ejection_fraction_mae"]["video_value"] == 9.0
    assert not any(k.startswith("study_weighted_") and ("retrieval" in k or "patient" in k) for k in rows)
    assert "| zero-shot EF MAE (paper's rule) | 9.00 | 8.00 | 7.00 | 15.0 |" in df.markdown_table(rows).splitlines()
    assert not any("probe" in line for line in table)  # no probe rows given: no probe line
