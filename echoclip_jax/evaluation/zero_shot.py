"""Zero-shot scoring: how a task's prompts, compared with a video's frames, answer it (the paper's rules).

Scores come from similarities of each video's L2-normalised frame embeddings to P L2-normalised prompt
embeddings (the prompts of `echoclip_jax.evaluation.task_table`): dense `sims[N, T, P]`, or ragged
`sims[M, P]` with `lengths[N]` for videos of different lengths (every frame-wise rule is applied per video,
over its own frames). The same rules answer per study (`echoclip_jax.evaluation.study_level`): a study's
frames are its videos' frames end to end, and optional per-frame `weights` (each unit's summing to 1) turn
every frame mean into a weighted one.
"""

from __future__ import annotations

import math

import numpy as np

from echoclip_jax.evaluation import metrics
from echoclip_jax.evaluation.task_table import Task, build_prompts

TOP_FRACTION = 0.2  # regression: median of the top 20% of candidate values (the paper)


# ----------------------------------------------------------------------------------------- scoring
#
# Scores take the similarities of each video's frames to the prompts in one of two layouts: dense
# sims[N, T, P] (every video has T frames), or ragged sims[M, P] over the M frames of all videos laid end
# to end with `lengths[N]` (video i owns the next lengths[i] rows; real exports have videos of different
# lengths). Every frame-wise rule is applied per video over that video's own frames.


def similarities(frame_embeds, prompt_embeds) -> np.ndarray:
    """[..., D] x [P, D] -> [..., P] cosine similarities (inputs already L2-normalised): [N, T, D] frames
    give [N, T, P]; ragged frames [M, D] give [M, P]."""
    f = np.asarray(frame_embeds, dtype=np.float32)
    p = np.asarray(prompt_embeds, dtype=np.float32)
    if f.ndim not in (2, 3) or p.ndim != 2 or f.shape[-1] != p.shape[-1]:
        raise ValueError(f"frame embeddings {f.shape} must be [N, T, D] or [M, D] and prompts {p.shape} [P, D]")
    return f @ p.T


def ragged(sims: np.ndarray, lengths=None) -> tuple[np.ndarray, np.ndarray]:
    """(sims [M, P], lengths [N]) of either layout; checks that the lengths cover the frames."""
    sims = np.asarray(sims)
    if lengths is None:
        if sims.ndim != 3:
            raise ValueError(f"similarities {sims.shape}: expected [N, T, P], or [M, P] with per-video lengths")
        n, t = sims.shape[:2]
        return sims.reshape(n * t, sims.shape[2]), np.full(n, t, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if sims.ndim != 2 or lengths.ndim != 1 or (lengths < 1).any() or int(lengths.sum()) != len(sims):
        raise ValueError(
            f"ragged similarities {sims.shape} need [M, P] with lengths >= 1 summing to M; "
            f"got {len(lengths)} lengths summing to {int(lengths.sum())}"
        )
    return sims, lengths


def video_mean(x: np.ndarray, lengths: np.ndarray, weights=None) -> np.ndarray:
    """Per-video mean of frame-wise values x[M, ...] -> [N, ...] (float64 sums); with `weights[M]` the
    weighted mean (each unit's weights normalised by their sum: the study-level weighted pool)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if weights is not None:
        w = np.asarray(weights, np.float64)
        if w.shape != (len(x),):
            raise ValueError(f"{w.shape} frame weights for {len(x)} frames")
        sums = np.add.reduceat(
            np.asarray(x) * w.reshape(-1, *([1] * (np.ndim(x) - 1))), starts, axis=0, dtype=np.float64
        )
        return sums / np.add.reduceat(w, starts).reshape(-1, *([1] * (sums.ndim - 1)))
    sums = np.add.reduceat(np.asarray(x), starts, axis=0, dtype=np.float64)
    return sums / lengths.reshape(-1, *([1] * (sums.ndim - 1)))


def select_videos(sims: np.ndarray, lengths, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The videos where `keep[N]` is true, in the layout given (lengths None = dense)."""
    if lengths is None:
        return np.asarray(sims)[keep], None
    lengths = np.asarray(lengths, np.int64)
    return np.asarray(sims)[np.repeat(keep, lengths)], lengths[keep]


def score_binary(sims: np.ndarray, lengths=None, weights=None) -> np.ndarray:
    """Mean cosine similarity over a video's frames and the positive prompts (`weights`: see video_mean)."""
    flat, lengths = ragged(sims, lengths)
    return video_mean(flat.mean(axis=1, dtype=np.float64), lengths, weights)


def categorical_scores(
    sims: np.ndarray, values: np.ndarray, lengths=None, weights=None
) -> tuple[np.ndarray, np.ndarray]:
    """(classes, scores[N, C]): a class's score is its best prompt's frame-averaged similarity, so the
    argmax over classes is the argmax over class prompts."""
    per_prompt = video_mean(*ragged(sims, lengths), weights)  # [N, P]
    classes = np.unique(values)
    scores = np.stack([per_prompt[:, values == c].max(axis=1) for c in classes], axis=1)
    return classes, scores


def predict_categorical(sims: np.ndarray, values: np.ndarray, lengths=None) -> np.ndarray:
    classes, scores = categorical_scores(sims, values, lengths)
    return classes[scores.argmax(axis=1)]


def _top_k(num_candidates: int, top_fraction: float) -> int:
    return max(1, int(num_candidates * top_fraction))


def _ranked_values(sims: np.ndarray, values: np.ndarray) -> np.ndarray:
    # Stable sort on -sims: among equal similarities the earlier prompt ranks first.
    return values[np.argsort(-sims, axis=-1, kind="stable")]


def predict_regression(
    sims: np.ndarray,
    values: np.ndarray,
    lengths=None,
    *,
    variant: str = "paper",
    top_fraction: float = TOP_FRACTION,
    weights=None,
) -> np.ndarray:
    """Value predicted for each video from its frames' similarities to prompts standing for `values[P]`.

    "paper": per frame, rank the candidate values by similarity and take the median of the top 20%;
    then average the video's frame predictions.
    "repository": EchoCLIP's released code: rank per frame, average the ranked values across the video's
    frames rank by rank, then take the median of the top 20% (torch's median: the lower middle value).
    `weights`: frame means become weighted means (see video_mean).
    """
    values = np.asarray(values, dtype=np.float64)
    flat, lengths = ragged(sims, lengths)
    if flat.shape[-1] != len(values):
        raise ValueError(f"{flat.shape[-1]} prompt similarities for {len(values)} values")
    if variant not in ("paper", "repository"):
        raise ValueError(f"unknown regression variant {variant!r} (use 'paper' or 'repository')")
    k = _top_k(len(values), top_fraction)
    ranked = (
        np.concatenate(
            [
                _ranked_values(flat[i : i + 16384], values)[:, :k]  # [M, k], in slices of frames
                for i in range(0, len(flat), 16384)
            ]
        )
        if len(flat)
        else np.zeros((0, k))
    )
    if variant == "paper":
        return video_mean(np.median(ranked, axis=-1), lengths, weights)
    averaged = np.sort(video_mean(ranked, lengths, weights), axis=-1)  # [N, k]
    return averaged[:, (k - 1) // 2]


# ------------------------------------------------------------------------------------- evaluation


def evaluate_task(
    task: Task, sims: np.ndarray, labels: np.ndarray, *, lengths=None, calibration: tuple | None = None, weights=None
) -> dict:
    """Metrics of one task over the videos with a known label (labels NaN = unknown, left out).

    `sims` dense [N, T, P], or ragged [M, P] with `lengths[N]` (see above). Returns a JSON-able dict of
    metrics plus "_curves" (arrays for plots) that callers drop before saving. `calibration = (labels,
    scores)` from another split sets the binary threshold. `weights[M]` (ragged only): per-frame weights of
    the weighted study pool (see video_mean).
    """
    known = np.isfinite(labels)
    y = labels[known]
    s, ls = select_videos(sims, lengths, known)
    if weights is not None:
        if lengths is None:
            raise ValueError("frame weights need the ragged layout (sims [M, P] with lengths)")
        weights = np.asarray(weights)[np.repeat(known, np.asarray(lengths, np.int64))]
    out: dict = {"mode": task.mode, "n": int(known.sum())}
    if not known.any():
        return out
    if task.mode == "binary":
        scores = score_binary(s, ls, weights)
        out.update(metrics.binary_metrics(y.astype(int), scores, calibration=calibration))
        out["_curves"] = {"labels": y.astype(int), "scores": scores}
    elif task.mode == "categorical":
        _, values = build_prompts(task)
        classes, scores = categorical_scores(s, values, ls, weights)
        pred = classes[scores.argmax(axis=1)]
        scorable = np.isin(y, classes)  # e.g. "normal" has no prompt: it can never be predicted
        out["accuracy"] = metrics.accuracy(y[scorable], pred[scorable]) if scorable.any() else math.nan
        out["n_scorable"] = int(scorable.sum())
        aucs = metrics.per_class_auc(y, scores, list(classes))
        names = task.value_mapping
        out["per_class_auc"] = {str(names.get(c, c)): v for c, v in aucs.items()}
        finite = [v for v in aucs.values() if np.isfinite(v)]
        out["macro_auc"] = float(np.mean(finite)) if finite else math.nan
        out["class_counts"] = {str(names.get(c, c)): int((y == c).sum()) for c in np.unique(y)}
    else:
        _, values = build_prompts(task)
        for variant in ("paper", "repository"):
            pred = predict_regression(s, values, ls, variant=variant, weights=weights)
            suffix = "" if variant == "paper" else "_repository"
            out["mae" + suffix] = metrics.mae(y, pred)
            out["r2" + suffix] = metrics.r2(y, pred)
            if variant == "paper":
                out["_curves"] = {"true": y, "pred": pred}
    return out
