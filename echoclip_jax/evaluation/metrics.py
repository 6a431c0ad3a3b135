"""Evaluation metrics in plain numpy: classification, regression, cross-modal retrieval, patient identity.

Kept free of JAX and scikit-learn so every number in an evaluation report can be read off this file.
Conventions: scores are "higher = more positive"; a metric that is undefined for the data it is given
(an AUC with one class, an R² of a constant target) is NaN rather than an exception, so one degenerate
task does not abort a sweep.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _binary_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal-length 1-D arrays")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0/1 (or booleans)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(bool), s


# ------------------------------------------------------------------------------------ binary / ROC


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > random negative), ties counting 1/2.

    Computed from average ranks (Mann-Whitney U), exact with ties and O(n log n).
    """
    y, s = _binary_inputs(labels, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average rank (1-based) within each group of tied scores.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with one point per distinct score, starting at (0, 0) (threshold +inf).

    A sample is called positive when score >= threshold.
    """
    y, s = _binary_inputs(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tps = np.cumsum(y_sorted)
    fps = np.cumsum(~y_sorted)
    last_of_group = np.r_[np.diff(s_sorted) != 0, True]
    tps, fps, thr = tps[last_of_group], fps[last_of_group], s_sorted[last_of_group]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, thr]


def confusion_at(labels, scores, threshold: float) -> dict[str, int]:
    y, s = _binary_inputs(labels, scores)
    pred = s >= threshold
    return {
        "tp": int((pred & y).sum()),
        "fp": int((pred & ~y).sum()),
        "fn": int((~pred & y).sum()),
        "tn": int((~pred & ~y).sum()),
    }


def f1_at(labels, scores, threshold: float) -> float:
    c = confusion_at(labels, scores, threshold)
    denom = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2 * c["tp"] / denom if denom else float("nan")


def best_threshold(labels, scores, criterion: str = "f1") -> float:
    """The score threshold that maximises F1 ("f1") or Youden's J = TPR - FPR ("youden") on these data.

    Candidates are the distinct scores (predict positive when score >= threshold); the first maximum wins.
    """
    y, s = _binary_inputs(labels, scores)
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr, thr = roc_curve(y, s)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the (0, 0) point at +inf: it predicts nothing
    if criterion == "youden":
        return float(thr[np.argmax(tpr - fpr)])
    if criterion == "f1":
        n_pos, n_neg = y.sum(), (~y).sum()
        tp, fp = tpr * n_pos, fpr * n_neg
        f1 = 2 * tp / (tp + fp + n_pos)  # 2TP / (2TP + FP + FN), FN = n_pos - TP
        return float(thr[np.argmax(f1)])
    raise ValueError(f"unknown threshold criterion {criterion!r} (use 'f1' or 'youden')")


def binary_metrics(labels, scores, *, calibration: tuple | None = None, criterion: str = "f1") -> dict:
    """AUC, plus F1/sensitivity/specificity at a threshold chosen by `criterion`.

    The threshold is chosen on `calibration = (labels, scores)` (e.g. the validation split) when given,
    otherwise on these same data: the paper's "F1-calibrated threshold on the test set", which is
    optimistic and marked as such by `threshold_source = "self"`.
    """
    y, s = _binary_inputs(labels, scores)
    if calibration is not None:
        thr, source = best_threshold(*calibration, criterion=criterion), "calibration"
    else:
        thr, source = best_threshold(y, s, criterion=criterion), "self"
    out = {
        "auc": roc_auc(y, s),
        "n": int(len(y)),
        "n_pos": int(y.sum()),
        "threshold": thr,
        "threshold_source": source,
        "threshold_criterion": criterion,
    }
    if np.isfinite(thr):
        c = confusion_at(y, s, thr)
        out["f1"] = f1_at(y, s, thr)
        out["sensitivity"] = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
        out["specificity"] = c["tn"] / (c["tn"] + c["fp"]) if c["tn"] + c["fp"] else float("nan")
    else:
        out["f1"] = out["sensitivity"] = out["specificity"] = float("nan")
    return out


# ------------------------------------------------------------------------------------ categorical


def accuracy(labels, predictions) -> float:
    y, p = np.asarray(labels), np.asarray(predictions)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in shape")
    return float((y == p).mean()) if y.size else float("nan")


def per_class_auc(labels, class_scores, classes: Sequence) -> dict:
    """One-vs-rest AUC of each class: class_scores[:, j] scores membership of classes[j]."""
    y = np.asarray(labels)
    scores = np.asarray(class_scores, dtype=np.float64)
    if scores.shape != (len(y), len(classes)):
        raise ValueError(f"class_scores {scores.shape} must be (n={len(y)}, classes={len(classes)})")
    return {c: roc_auc(y == c, scores[:, j]) for j, c in enumerate(classes)}


# ------------------------------------------------------------------------------------- regression


def _regression_inputs(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must be equal-length 1-D arrays")
    return t, p


def mae(y_true, y_pred) -> float:
    t, p = _regression_inputs(y_true, y_pred)
    return float(np.abs(t - p).mean()) if t.size else float("nan")


def r2(y_true, y_pred) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (negative when worse than predicting the mean)."""
    t, p = _regression_inputs(y_true, y_pred)
    ss_tot = ((t - t.mean()) ** 2).sum() if t.size else 0.0
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - ((t - p) ** 2).sum() / ss_tot)


# -------------------------------------------------------------------------------------- retrieval


def _rank_of_diagonal(queries: np.ndarray, candidates: np.ndarray, chunk_size: int, matmul) -> np.ndarray:
    """Rank (1 = best) of candidate i for query i, computing chunk_size x N similarities at a time.

    Rank = 1 + the number of candidates strictly more similar than the true one: ties (e.g. two identical
    reports) go in the query's favour.
    """
    n = len(queries)
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = np.asarray(matmul(queries[start:stop], candidates), dtype=np.float32)  # [c, N]
        true = sims[np.arange(stop - start), np.arange(start, stop)]
        ranks[start:stop] = 1 + (sims > true[:, None]).sum(axis=1)
    return ranks


def rank_summary(ranks: np.ndarray, num_candidates: int, ks: Sequence[int] = (1, 5, 10)) -> dict:
    ranks = np.asarray(ranks)
    out = {
        "mean_rank": float(ranks.mean()),
        "median_rank": float(np.median(ranks)),
        "mean_rank_fraction": float((ranks / num_candidates).mean()),
        "num_candidates": int(num_candidates),
    }
    for k in ks:
        out[f"recall@{k}"] = float((ranks <= k).mean())
    return out


def retrieval_metrics(image_embeds, text_embeds, *, chunk_size: int = 1024, matmul: Callable | None = None) -> dict:
    """Image->text and text->image retrieval where pair i (video i, report i) is the match.

    Embeddings are L2-normalised [N, D]. Memory is O(chunk_size * N), so 100k x 100k never exists at
    once. `matmul(a, b)` computes a @ b.T (numpy by default; pass a jitted device matmul for speed).
    """
    img = np.asarray(image_embeds, dtype=np.float32)
    txt = np.asarray(text_embeds, dtype=np.float32)
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"image {img.shape} and text {txt.shape} embeddings must both be [N, D]")
    mm = matmul or (lambda a, b: a @ b.T)
    n = len(img)
    i2t = _rank_of_diagonal(img, txt, chunk_size, mm)
    t2i = _rank_of_diagonal(txt, img, chunk_size, mm)
    return {"image_to_text": rank_summary(i2t, n), "text_to_image": rank_summary(t2i, n)}


# ---------------------------------------------------------------------------- patients and studies


def study_embeddings(video_embeds, study_ids) -> tuple[list, np.ndarray]:
    """Mean of a study's L2-normalised video embeddings, re-normalised; studies in first-seen order."""
    emb = np.asarray(video_embeds, dtype=np.float64)
    keys, inverse = [], []
    index: dict = {}
    for s in study_ids:
        if s not in index:
            index[s] = len(keys)
            keys.append(s)
        inverse.append(index[s])
    sums = np.zeros((len(keys), emb.shape[1]))
    np.add.at(sums, np.asarray(inverse), emb)
    sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return keys, sums


def _first_values(keys: list, study_ids, values) -> np.ndarray:
    first = {}
    for s, v in zip(study_ids, values):
        first.setdefault(s, v)
    return np.asarray([first[k] for k in keys])


def patient_identification(
    video_embeds, patient_ids, study_ids, *, max_negatives: int = 1_000_000, seed: int = 0
) -> dict:
    """AUC of cosine similarity between two studies' embeddings for same vs different patient.

    Studies are the unit (videos are pooled per study), and only pairs of distinct studies count, so a
    model cannot score by recognising the same acquisition. All same-patient pairs are used; different-
    patient pairs are all used too when there are at most `max_negatives`, else a seeded uniform sample.
    Returns the AUC, pair counts, and the scores/labels (for a ROC plot).
    """
    keys, emb = study_embeddings(video_embeds, study_ids)
    patients = _first_values(keys, study_ids, patient_ids)
    n = len(keys)
    _, pid = np.unique(patients, return_inverse=True)
    by_patient: dict[int, list[int]] = {}
    for i, p in enumerate(pid):
        by_patient.setdefault(int(p), []).append(i)
    pos_a, pos_b = [], []
    for members in by_patient.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                pos_a.append(members[x])
                pos_b.append(members[y])
    n_pairs = n * (n - 1) // 2
    n_neg_total = n_pairs - len(pos_a)
    if n_neg_total <= max_negatives:
        a, b = np.triu_indices(n, k=1)
        keep = pid[a] != pid[b]
        neg_a, neg_b = a[keep], b[keep]
    else:
        rng = np.random.default_rng(seed)
        a = rng.integers(0, n, size=2 * max_negatives)
        b = rng.integers(0, n, size=2 * max_negatives)
        keep = pid[a] != pid[b]
        neg_a, neg_b = a[keep][:max_negatives], b[keep][:max_negatives]
    pos_a, pos_b = np.asarray(pos_a, dtype=np.int64), np.asarray(pos_b, dtype=np.int64)
    sims = np.r_[(emb[pos_a] * emb[pos_b]).sum(1), (emb[neg_a] * emb[neg_b]).sum(1)]
    labels = np.r_[np.ones(len(pos_a), bool), np.zeros(len(neg_a), bool)]
    return {
        "auc": roc_auc(labels, sims) if len(labels) else float("nan"),
        "n_studies": n,
        "n_same": int(len(pos_a)),
        "n_different": int(len(neg_a)),
        "scores": sims,
        "labels": labels,
    }


def clinical_change(video_embeds, patient_ids, study_ids, study_days, labels) -> dict:
    """Dissimilarity to the patient's earliest study as a score for a new finding (e.g. a new device).

    For every later study of a patient whose earliest study is label-negative, the score is
    1 - cos(study embedding, earliest study embedding) and the target is the later study's label
    (a study is positive when any of its videos is). Patients whose first study is already positive
    have no transition to detect and are left out. Returns the AUC and the counts.
    """
    keys, emb = study_embeddings(video_embeds, study_ids)
    patients = _first_values(keys, study_ids, patient_ids)
    days = _first_values(keys, study_ids, study_days).astype(np.float64)
    pos = {}
    for s, v in zip(study_ids, labels):
        pos[s] = pos.get(s, False) or bool(v)
    study_label = np.asarray([pos[k] for k in keys])
    scores, targets = [], []
    for p in np.unique(patients):
        members = np.flatnonzero(patients == p)
        if len(members) < 2:
            continue
        members = members[np.argsort(days[members], kind="mergesort")]
        base = members[0]
        if study_label[base]:
            continue
        for later in members[1:]:
            scores.append(1.0 - float(emb[base] @ emb[later]))
            targets.append(bool(study_label[later]))
    scores_a, targets_a = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=bool)
    return {
        "auc": roc_auc(targets_a, scores_a) if len(scores) else float("nan"),
        "n": int(len(scores)),
        "n_pos": int(targets_a.sum()),
    }
