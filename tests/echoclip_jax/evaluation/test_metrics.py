import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from echoclip_jax.evaluation import metrics


def test_auc_hand_computed():
    # Positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered correctly.
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4.
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert metrics.roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0
    assert math.isnan(metrics.roc_auc([1, 1], [0.1, 0.2]))


def test_auc_matches_sklearn_with_many_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.integers(0, 7, 500) + 0.5 * y  # heavy ties
    assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_curve_points_and_area():
    fpr, tpr, thr = metrics.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(0.75)


def test_thresholds_f1_and_youden():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # F1 at 0.8: 2/3; at 0.35: 2*2/(4+1) = 0.8; at 0.1: 4/6.
    assert metrics.best_threshold(y, s, "f1") == 0.35
    assert metrics.f1_at(y, s, 0.35) == pytest.approx(0.8)
    # Youden J: 0.5 at 0.8 and at 0.35; the first (strictest) maximum wins.
    assert metrics.best_threshold(y, s, "youden") == 0.8
    with pytest.raises(ValueError, match="criterion"):
        metrics.best_threshold(y, s, "accuracy")


def test_binary_metrics_calibrated_elsewhere():
    test = ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    out = metrics.binary_metrics(*test, calibration=([0, 1], [0.2, 0.5]))
    assert out["threshold"] == 0.5 and out["threshold_source"] == "calibration"
    # At 0.5 only 0.8 is called positive: TP 1, FP 0, FN 1.
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["sensitivity"] == 0.5 and out["specificity"] == 1.0
    assert metrics.binary_metrics(*test)["threshold_source"] == "self"


def test_bad_binary_input_is_rejected():
    with pytest.raises(ValueError, match="0/1"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal-length"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2])


def test_accuracy_and_per_class_auc():
    assert metrics.accuracy([1, 2, 3, 3], [1, 2, 2, 3]) == 0.75
    y = np.array([1, 2, 3, 1])
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.1, 0.3, 0.7], [0.3, 0.4, 0.2]])
    aucs = metrics.per_class_auc(y, scores, [1, 2, 3])
    # class 1: positives {0.9, 0.3} vs negatives {0.2, 0.1}: 1.0; class 2: 0.8 beats {0.1, 0.3, 0.4};
    # class 3: 0.7 beats {0.0, 0.1, 0.2}. Negated scores reverse every order.
    assert aucs == {1: 1.0, 2: 1.0, 3: 1.0}
    assert metrics.per_class_auc(y, -scores, [1, 2, 3])[3] == 0.0


def test_mae_r2_hand_computed():
    assert metrics.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    # SS_res = 1, SS_tot = 2.
    assert metrics.r2([1, 2, 3], [1, 2, 4]) == pytest.approx(0.5)
    assert metrics.r2([1, 2, 3], [1, 2, 3]) == 1.0
    assert math.isnan(metrics.r2([2, 2], [1, 3]))


def _brute_force_ranks(q, c):
    sims = q @ c.T
    return np.array([1 + np.sum(sims[i] > sims[i, i]) for i in range(len(q))])


def test_retrieval_ranks_chunked_equal_brute_force():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(37, 8)).astype(np.float32)
    txt = (img + rng.normal(scale=1.5, size=img.shape)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    out = metrics.retrieval_metrics(img, txt, chunk_size=8)
    i2t, t2i = _brute_force_ranks(img, txt), _brute_force_ranks(txt, img)
    assert out["image_to_text"]["mean_rank"] == pytest.approx(i2t.mean())
    assert out["image_to_text"]["median_rank"] == pytest.approx(np.median(i2t))
    assert out["text_to_image"]["mean_rank"] == pytest.approx(t2i.mean())
    assert out["text_to_image"]["recall@5"] == pytest.approx((t2i <= 5).mean())
    assert out["image_to_text"]["mean_rank_fraction"] == pytest.approx((i2t / 37).mean())


def test_retrieval_hand_case():
    img = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    txt = np.array([[0, 1], [0, 1], [1, 0]], np.float32)
    out = metrics.retrieval_metrics(img, txt, chunk_size=2)
    # image 0: sims to texts [0, 0, 1] -> true 0, only text 2 is higher -> rank 2.
    # image 1: [1, 1, 0] -> true 1, none strictly higher -> rank 1.
    # image 2: [0.8, 0.8, 0.6] -> true 0.6, two higher -> rank 3.
    assert out["image_to_text"]["mean_rank"] == pytest.approx(2.0)
    assert out["image_to_text"]["recall@1"] == pytest.approx(1 / 3)
    assert out["image_to_text"]["median_rank"] == 2.0


def test_patient_identification_matches_pairwise_brute_force():
    rng = np.random.default_rng(2)
    patients = np.repeat(np.arange(6), 4)  # 6 patients x 2 studies x 2 videos
    studies = np.repeat(np.arange(12), 2)
    centre = rng.normal(size=(6, 5))
    emb = centre[patients] + rng.normal(scale=1.2, size=(24, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = metrics.patient_identification(emb, [f"p{p}" for p in patients], [f"s{s}" for s in studies])
    # Brute force: study embedding = normalised mean of its two videos; all distinct-study pairs.
    st = np.stack([emb[studies == s].mean(0) for s in range(12)])
    st /= np.linalg.norm(st, axis=1, keepdims=True)
    st_patient = np.arange(12) // 2
    ys, ss = [], []
    for a in range(12):
        for b in range(a + 1, 12):
            ys.append(st_patient[a] == st_patient[b])
            ss.append(st[a] @ st[b])
    assert out["n_same"] == 6 and out["n_different"] == 60
    assert out["auc"] == pytest.approx(roc_auc_score(ys, ss))


def test_patient_identification_sampled_negatives_are_cross_patient():
    rng = np.random.default_rng(3)
    n = 40
    emb = rng.normal(size=(n, 4))
    out = metrics.patient_identification(emb, np.arange(n) // 2, np.arange(n), max_negatives=100)
    assert out["n_different"] == 100 and out["n_same"] == 20
    assert 0.0 <= out["auc"] <= 1.0


def test_clinical_change_scores_dissimilarity_to_first_study():
    e0, e1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    close = np.array([0.9, np.sqrt(1 - 0.81)])
    emb = np.stack([e0, e1, e0, close, e1, e0])
    patients = ["a", "a", "b", "b", "c", "c"]
    studies = ["a1", "a2", "b1", "b2", "c1", "c2"]
    days = [0, 30, 0, 10, 0, 5]
    labels = [0, 1, 0, 0, 1, 1]  # a: new finding; b: none; c: positive from the start (left out)
    out = metrics.clinical_change(emb, patients, studies, days, labels)
    assert out["n"] == 2 and out["n_pos"] == 1
    assert out["auc"] == 1.0  # a changed completely (score 1), b barely (score 0.1)
