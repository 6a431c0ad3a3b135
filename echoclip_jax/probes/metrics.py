"""Scores of the probes (`echoclip_jax.probe`) and their baseline, all from scikit-learn's metrics, and their
plots: classification (accuracy, balanced accuracy, macro one-vs-rest AUC, confusion matrix) and regression
(MAE, R2). The baseline is scored by the same functions on the same items, so each figure has its
reference beside it. Plots are written under a local directory or a gs:// folder."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.metrics import ConfusionMatrixDisplay

from echoclip_jax.runtime import storage


def predict(estimator, x, task: str):
    """A fitted scikit-learn estimator's (labels, class probabilities) or predictions."""
    if task == "classification":
        return estimator.predict(x), estimator.predict_proba(x)
    return estimator.predict(x)


def classification_metrics(y_true, y_pred, proba, classes) -> dict:
    """Accuracy, balanced accuracy, macro one-vs-rest AUC (null unless the evaluated items hold at least two
    classes, all seen in training), confusion matrix over the training and evaluated classes."""

    labels = sorted(set(classes) | set(y_true))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        out = {
            "n": int(len(y_true)),
            "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(metrics.balanced_accuracy_score(y_true, y_pred)),
        }
    present = set(y_true)
    auc = None
    if len(present) >= 2 and present <= set(classes):
        if len(classes) == 2:
            auc = metrics.roc_auc_score(np.asarray(y_true) == classes[1], proba[:, 1])
        elif present == set(classes):
            auc = metrics.roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=list(classes))
    out["auc_macro_ovr"] = None if auc is None else float(auc)
    out["confusion_matrix"] = {
        "labels": [str(c) for c in labels],
        "matrix": metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    return out


def regression_metrics(y_true, y_pred) -> dict:
    """MAE and R2 (null with fewer than 2 items)."""

    return {
        "n": int(len(y_true)),
        "mae": float(metrics.mean_absolute_error(y_true, y_pred)),
        "r2": float(metrics.r2_score(y_true, y_pred)) if len(y_true) >= 2 else None,
    }


def score(task: str, y_true, prediction, classes) -> dict:
    """The metrics of `task` for a prediction as `predict` returns it."""
    if task == "classification":
        return classification_metrics(y_true, *prediction, classes)
    return regression_metrics(y_true, prediction)


def baseline(x_train, y_train, x_eval, y_eval, task: str) -> dict:
    """The training split's majority class or mean, scored like the probes."""

    dummy = DummyClassifier(strategy="most_frequent") if task == "classification" else DummyRegressor()
    dummy.fit(x_train, y_train)
    classes = list(getattr(dummy, "classes_", []))
    out = score(task, y_eval, predict(dummy, x_eval, task), classes)
    out["strategy"] = "majority class" if task == "classification" else "training mean"
    return out


# ---------------------------------------------------------------------------------------- plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot(out_dir: str, label: str, probe: str, task: str, y_true, prediction) -> str:
    """Writes out_dir/plots/<label>_<probe>_confusion.png or .../<label>_<probe>_pred_vs_true.png (out_dir
    local or gs://); returns its path relative to out_dir."""
    if task == "classification":
        labels = sorted(set(y_true) | set(prediction[0]))
        fig = Figure(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
        ax = fig.subplots()
        ConfusionMatrixDisplay.from_predictions(y_true, prediction[0], labels=labels, ax=ax, colorbar=False)
        name = f"plots/{_safe(label)}_{probe}_confusion.png"
    else:
        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
        ax.scatter(y_true, prediction, s=10, alpha=0.6)
        lo, hi = float(min(np.min(y_true), np.min(prediction))), float(max(np.max(y_true), np.max(prediction)))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true {label}")
        ax.set_ylabel(f"predicted {label}")
        name = f"plots/{_safe(label)}_{probe}_pred_vs_true.png"
    ax.set_title(f"{label}: {probe} probe", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    storage.write_bytes(storage.join(out_dir, name), png.getvalue())
    return name
