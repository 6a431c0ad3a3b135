import json

import numpy as np
import pytest

from echoclip_jax.evaluation import task_table
from echoclip_jax.evaluation import zero_shot as zs


@pytest.fixture(scope="module")
def tasks():
    return {t.name: t for t in task_table.load_tasks()}


def test_default_table_is_the_papers_sixteen_tasks(tasks, reference_dir):
    published = json.loads((reference_dir / "prompts_used.json").read_text())
    assert list(tasks) == list(published)
    assert len(tasks) == 16
    for name, spec in published.items():
        assert tasks[name].mode == spec["mode"]
        assert list(tasks[name].label_sources) == spec["label_sources"]
    assert tasks["impella"].testers != tasks["impella"].label_sources  # a filled-in tester
    assert tasks["ejection_fraction"].label_column == "ef"


def test_select_tasks_by_name_and_alias(tmp_path):
    picked = task_table.load_tasks(names=["ef", "pacemaker"])
    assert [t.name for t in picked] == ["ejection_fraction", "pacemaker"]
    with pytest.raises(ValueError, match="unknown task.*'nope'"):
        task_table.load_tasks(names=["nope"])


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"mode": "ordinal", "label_sources": ["X."]}, "mode must be one of"),
        ({"mode": "binary", "label_sources": []}, "label_sources"),
        ({"mode": "categorical", "label_sources": ["A.", "B."], "values": [1]}, "one per label source"),
        ({"mode": "regression", "label_sources": ["EF IS <#>%."]}, "range"),
        ({"mode": "regression", "label_sources": ["EF IS HIGH."], "range": [0, 100]}, "needs a <#>"),
    ],
)
def test_bad_table_names_file_task_and_problem(tmp_path, spec, problem):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"mytask": spec}))
    with pytest.raises(ValueError, match=problem) as e:
        task_table.load_tasks(str(path))
    assert str(path) in str(e.value) and "mytask" in str(e.value)


def test_unreadable_table(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        task_table.load_tasks(str(path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        task_table.load_tasks(str(tmp_path / "missing.json"))


def test_regression_prompts_fill_every_value(tasks):
    texts, values = task_table.build_prompts(tasks["ejection_fraction"])
    assert len(texts) == 2 * 101 and len(values) == 202
    assert texts[55] == "THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE 55% "
    assert texts[101 + 7] == "LV EJECTION FRACTION IS 7%. " and values[101 + 7] == 7
    texts, values = task_table.build_prompts(tasks["left_ventricle_size"])
    assert texts[0] == "MILD DILATED LEFT VENTRICLE. " and list(values) == [1, 2, 3]
    assert task_table.build_prompts(tasks["pacemaker"])[1] is None


@pytest.mark.parametrize(
    "task, report, label",
    [
        ("ejection_fraction", "NORMAL LV SIZE. LV EJECTION FRACTION IS 55%. NO EFFUSION.", 55.0),
        ("ejection_fraction", "THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE 37.5% ", 37.5),
        ("ejection_fraction", "THE LEFT VENTRICULAR  EJECTION FRACTION IS\nESTIMATED TO BE 40%.", 40.0),
        ("ejection_fraction", "NORMAL LEFT VENTRICULAR SIZE.", None),
        ("ejection_fraction", "LV EJECTION FRACTION IS 150%.", None),  # outside the range
        ("pulmonary_artery_pressure_continuous", "ESTIMATED PA PRESSURE IS 42MMHG.", 42.0),
        ("pacemaker", "ECHO DENSITY IN RIGHT ATRIUM SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD. ", 1.0),
        ("pacemaker", "NORMAL RIGHT VENTRICLE.", 0.0),
        ("normal_wall_thickness", "NORMAL LEFT VENTRICULAR WALL THICKNESS.", 1.0),
        ("normal_wall_thickness", "ABNORMAL LEFT VENTRICULAR WALL THICKNESS.", 0.0),
        (
            "impella",
            "AN IMPELLA CATHETER IS SEEN AND THE INLET AREA IS 3.5CM FROM THE AORTIC VALVE AND DOES NOT "
            "INTERFERE WITH NEIGHBORING STRUCTURES, CONSISTENT WITH CORRECT IMPELLA POSITIONING. THERE IS "
            "DENSE TURBULENT COLOR FLOW ABOVE THE AORTIC VALVE, CONSISTENT WITH CORRECT OUTFLOW AREA "
            "POSITION.",
            1.0,
        ),
        ("left_ventricle_size", "SEVERE DILATED LEFT VENTRICLE BY VOLUME. LV EJECTION FRACTION IS 20%.", 3.0),
        ("left_ventricle_size", "MILD DILATED LEFT VENTRICLE.", 1.0),
        ("left_ventricle_size", "NORMAL LEFT VENTRICULAR SIZE.", 0.0),  # the table names a 0 class
        ("pericardial_effusion", "NO PERICARDIAL EFFUSION.", None),  # no 0 class: unknown
        ("pericardial_effusion", "MODERATE PERICARDIAL EFFUSION. CARDIAC TAMPONADE IS PRESENT.", 4.0),
        (
            "right_atrial_pressure",
            "THE INFERIOR VENA CAVA SHOWS A NORMAL RESPIRATORY COLLAPSE CONSISTENT WITH "
            "NORMAL RIGHT ATRIAL PRESSURE (3MMHG).",
            0.0,
        ),
    ],
)
def test_label_extraction(tasks, task, report, label):
    assert task_table.extract_label(tasks[task], report) == label


def test_label_column_wins_where_known(tasks):
    reports = ["LV EJECTION FRACTION IS 55%.", "LV EJECTION FRACTION IS 30%.", ""]
    labels = task_table.task_labels(tasks["ejection_fraction"], reports, {"ef": [61.5, np.nan, 44.0]})
    np.testing.assert_array_equal(labels, [61.5, 30.0, 44.0])
    with pytest.raises(ValueError, match="label column 'ef' has 2 values for 3 videos"):
        task_table.task_labels(tasks["ejection_fraction"], reports, {"ef": [1.0, 2.0]})


def _sims_ranking(order_per_frame, num_values):
    """sims[1, T, P] where frame t ranks values order_per_frame[t] first (in that order), the rest after."""
    sims = np.zeros((1, len(order_per_frame), num_values), np.float32)
    for t, order in enumerate(order_per_frame):
        sims[0, t] = -1.0 - np.arange(num_values) * 1e-3  # the rest: value order, all below the top
        for r, v in enumerate(order):
            sims[0, t, v] = 1.0 - 0.1 * r
    return sims


def test_regression_rule_paper_vs_repository():
    values = np.arange(15.0)  # 15 candidates -> top 20% = 3
    # Frame A ranks 10, 2, 6 first (median 6); frame B ranks 1, 9, 13 (median 9).
    sims = _sims_ranking([[10, 2, 6], [1, 9, 13]], 15)
    # Paper: per-frame medians averaged = (6 + 9) / 2.
    assert zs.predict_regression(sims, values, variant="paper")[0] == pytest.approx(7.5)
    # Repository: rank-wise means (10+1)/2, (2+9)/2, (6+13)/2 = 5.5, 5.5, 9.5 -> median 5.5.
    assert zs.predict_regression(sims, values, variant="repository")[0] == pytest.approx(5.5)


def test_regression_repository_median_is_the_lower_middle():
    values = np.arange(10.0)  # top 20% = 2
    sims = _sims_ranking([[7, 3], [4, 6]], 10)
    assert zs.predict_regression(sims, values, variant="paper")[0] == pytest.approx(5.0)
    # Rank-wise means 5.5 and 4.5; torch.median returns the lower one.
    assert zs.predict_regression(sims, values, variant="repository")[0] == pytest.approx(4.5)
    with pytest.raises(ValueError, match="variant"):
        zs.predict_regression(sims, values, variant="mean")


def test_binary_and_categorical_scores():
    sims = np.array([[[0.1, 0.3], [0.5, 0.7]]])  # one video, 2 frames, 2 prompts
    assert zs.score_binary(sims)[0] == pytest.approx(0.4)
    values = np.array([1.0, 2.0, 2.0])
    sims = np.array(
        [
            [[0.9, 0.1, 0.2], [0.7, 0.3, 0.0]],  # frame-mean [0.8, 0.2, 0.1] -> class 1
            [[0.1, 0.2, 0.8], [0.3, 0.2, 0.6]],
        ]
    )  # frame-mean [0.2, 0.2, 0.7] -> class 2
    np.testing.assert_array_equal(zs.predict_categorical(sims, values), [1.0, 2.0])


def test_evaluate_task_on_constructed_embeddings(tasks):
    rng = np.random.default_rng(0)
    dim = 16
    prompts = rng.normal(size=(2, dim))
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    labels = np.array([1, 0, 1, 0, 0, np.nan])
    frames = rng.normal(scale=0.3, size=(6, 3, dim)) + 2.0 * np.where(labels == 1, 1, 0)[:, None, None] * prompts.mean(
        0
    )
    frames /= np.linalg.norm(frames, axis=-1, keepdims=True)
    out = zs.evaluate_task(tasks["pacemaker"], zs.similarities(frames, prompts), labels)
    assert out["n"] == 5 and out["n_pos"] == 2
    assert out["auc"] == 1.0 and out["f1"] == 1.0
    assert len(out["_curves"]["scores"]) == 5


def _ragged_sims(rng, lengths, prompts):
    """Per-video dense sims [1, T_i, P] and the same frames end to end [M, P]."""
    per_video = [rng.uniform(-1, 1, size=(1, t, prompts)).astype(np.float32) for t in lengths]
    return per_video, np.concatenate([v[0] for v in per_video])


def test_ragged_scores_equal_each_video_scored_alone(tasks):
    """Videos of 1, 4, 2 and 7 frames laid end to end: every rule (binary, categorical, both regression
    variants, evaluate_task) gives each video what it gives that video alone."""
    rng = np.random.default_rng(7)
    lengths = [1, 4, 2, 7]
    per_video, flat = _ragged_sims(rng, lengths, 202)
    _, values = task_table.build_prompts(tasks["ejection_fraction"])
    for variant in ("paper", "repository"):
        got = zs.predict_regression(flat, values, lengths, variant=variant)
        want = [zs.predict_regression(v, values, variant=variant)[0] for v in per_video]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    per_video, flat = _ragged_sims(rng, lengths, 3)
    np.testing.assert_allclose(zs.score_binary(flat, lengths), [zs.score_binary(v)[0] for v in per_video], rtol=1e-6)
    cat_values = np.array([1.0, 2.0, 2.0])
    np.testing.assert_array_equal(
        zs.predict_categorical(flat, cat_values, lengths), [zs.predict_categorical(v, cat_values)[0] for v in per_video]
    )
    # evaluate_task leaves out unlabelled videos frame for frame: the one-frame video unlabelled here
    labels = np.array([np.nan, 1.0, 0.0, 1.0])
    got = zs.evaluate_task(tasks["pacemaker"], flat, labels, lengths=lengths)
    kept = [v[0] for v, y in zip(per_video, labels) if np.isfinite(y)]
    assert got["n"] == 3 and list(got["_curves"]["labels"]) == [1, 0, 1]
    np.testing.assert_allclose(got["_curves"]["scores"], [k.mean() for k in kept], rtol=1e-6)


def test_ragged_lengths_must_cover_the_frames():
    with pytest.raises(ValueError, match="lengths >= 1 summing to M"):
        zs.score_binary(np.zeros((5, 2)), [2, 2])
    with pytest.raises(ValueError, match="lengths >= 1"):
        zs.score_binary(np.zeros((2, 2)), [2, 0])
    with pytest.raises(ValueError, match=r"expected \[N, T, P\]"):
        zs.score_binary(np.zeros((5, 2)))
