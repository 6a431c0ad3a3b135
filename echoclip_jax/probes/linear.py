"""The linear probe: scikit-learn on the (standardised) video or study embedding, multinomial
LogisticRegression (C) or Ridge (alpha), the strength chosen by cross-validation on the training split with
folds grouped by patient (`cv_folds`), so no patient's videos are on both sides of a fold.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

MAX_FOLDS = 5
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ALPHA_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def cv_folds(groups, max_folds: int = MAX_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, held-out indices) per fold, grouped so that no group (patient) is on both sides;
    min(max_folds, number of groups) folds; [] with fewer than 2 groups."""

    n_groups = len(set(groups))
    if n_groups < 2:
        return []
    splitter = GroupKFold(n_splits=min(max_folds, n_groups))
    return list(splitter.split(np.zeros((len(groups), 1)), groups=list(groups)))


def fit_linear(x: np.ndarray, y: np.ndarray, groups, task: str):
    """(fitted pipeline, hyperparameters, folds): StandardScaler + LogisticRegression (classification) or
    Ridge (regression), the strength chosen on patient-grouped folds of the training items."""

    if task == "classification":
        model, name, grid, scoring = LogisticRegression(max_iter=5000), "C", C_GRID, "balanced_accuracy"
    else:
        model, name, grid, scoring = Ridge(), "alpha", ALPHA_GRID, "neg_mean_absolute_error"
    pipe = make_pipeline(StandardScaler(), model)
    folds = cv_folds(groups)
    param = f"{type(model).__name__.lower()}__{name}"
    if not folds:
        pipe.fit(x, y)
        return pipe, {name: float(getattr(model, name)), "cv": "none (fewer than 2 training patients)"}, folds
    search = GridSearchCV(pipe, {param: list(grid)}, cv=folds, scoring=scoring)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # a fold lacking a class
        warnings.filterwarnings("ignore", category=LinAlgWarning)  # the smallest alphas; the chosen one is kept
        search.fit(x, y)
    hp = {
        name: float(search.best_params_[param]),
        "grid": list(grid),
        "cv_folds": len(folds),
        "cv_grouped_by": "patient_id",
        "cv_scoring": scoring,
        "cv_best_score": float(search.best_score_),
    }
    return search.best_estimator_, hp, folds
