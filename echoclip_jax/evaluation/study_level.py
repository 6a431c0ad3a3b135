"""Study-level answers: one answer per study from all of its videos (views), as EchoPrime and PanEcho answer.

A study is every video of a split that shares a study id (studies in first-seen order, as
`metrics.study_embeddings`). The report, and so every label, belongs to the study: every video of a study
carries the same report, so the study's labels come from that report (the first non-empty one among its
videos) and its EF column from the first finite value among them.

Zero-shot tasks keep the frame-wise rules of `echoclip_jax.evaluation.zero_shot` and change only the unit: a study's
frames are the concatenation of its videos' frames (ragged layout, `lengths` = frames per study), so
  binary       score = mean over all the study's frames of the mean similarity to the positive prompts
  categorical  class score = the best class prompt's similarity averaged over all the study's frames
  regression   "paper": the per-frame median of the top 20% candidate values, averaged over the study's
               frames; "repository": ranked values averaged over the study's frames, then the median
That is the paper's rule with more frames, not a new rule, and it is why the rules run over frames rather
than over the study embedding: the regression rule ranks candidate values per frame, which a single pooled
vector would change. With pool "mean" (the default) each frame counts once (a video counts by its frames).

Pool "weighted" (`--study_pool weighted`) lets the views that show a task's finding count most: video v of
a study gets weight softmax_v(relevance_v / temperature) over the study's videos, spread evenly over its
frames (w_v / T_v each), and every frame mean above becomes a weighted mean. relevance_v is the video's
own zero-shot similarity to the task's prompts: binary, its score (mean similarity to the positive
prompts: a soft maximum over views, so a device seen in one view of five is not averaged away);
categorical and regression, the mean over its frames of the best similarity to any of the task's prompts
(how much the view looks like something the prompts describe). Labels are never used. temperature -> 0 is
the most relevant view alone, -> infinity the per-video mean. The weights are per task; retrieval and
patient identification have no task, so they always use the mean study embedding.

Study embedding: the re-normalised mean of its videos' L2-normalised embeddings (`metrics.study_embeddings`).
Retrieval: study embedding vs the embedding of the study's report (one report per study). Patient
identification and clinical change were already study-level (`metrics` pools videos per study); here they
run on the study embeddings directly, so with one report per study their figures equal the video-level
block's. No study or patient identifier leaves this module: studies are numbered 0..S-1 internally.
"""

from __future__ import annotations

import math

import numpy as np

from echoclip_jax.evaluation import metrics, task_table
from echoclip_jax.evaluation import zero_shot as zs

POOLS = ("mean", "weighted")
TEMPERATURE = 0.01  # softmax temperature of the weighted pool: CLIP's largest logit scale (100), inverted


def _summary(counts: np.ndarray) -> dict:
    return {"min": int(counts.min()), "max": int(counts.max()), "mean": float(counts.mean())}


def _softmax_within(values: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Softmax of values[N] within each group (groups[N] in 0..num_groups-1), max-shifted for stability."""
    top = np.full(num_groups, -np.inf)
    np.maximum.at(top, groups, values)
    e = np.exp(values - top[groups])
    total = np.zeros(num_groups)
    np.add.at(total, groups, e)
    return e / total[groups]


class Studies:
    """A split's videos grouped into studies: the layout, labels' sources and embeddings of each study."""

    def __init__(self, split, *, pool: str = "mean", temperature: float = TEMPERATURE):
        if pool not in POOLS:
            raise ValueError(f"study pool must be one of {POOLS}, got {pool!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"study pool temperature must be a positive number, got {temperature}")
        self.pool, self.temperature = pool, float(temperature)
        keys, self.embeddings = metrics.study_embeddings(split.videos, split.study_id)
        index = {k: i for i, k in enumerate(keys)}
        self.study_of_video = np.asarray([index[s] for s in split.study_id], np.int64)  # [N]
        self.num_studies = len(keys)
        self.video_lengths = np.asarray(split.lengths, np.int64)
        # videos grouped by study (split order within a study), then their frames end to end
        self.video_order = np.argsort(self.study_of_video, kind="stable")
        self.videos_per_study = np.bincount(self.study_of_video, minlength=self.num_studies)
        starts = np.concatenate([[0], np.cumsum(self.video_lengths)[:-1]])
        self.frame_index = (
            np.concatenate([np.arange(starts[v], starts[v] + self.video_lengths[v]) for v in self.video_order])
            if len(self.video_order)
            else np.zeros(0, np.int64)
        )
        self.lengths = np.bincount(self.study_of_video, weights=self.video_lengths, minlength=self.num_studies).astype(
            np.int64
        )  # frames per study
        self.report = [""] * self.num_studies
        self.ef = np.full(self.num_studies, np.nan)
        self.patient = [None] * self.num_studies
        self.day = np.zeros(self.num_studies)
        seen = np.zeros(self.num_studies, bool)
        for v, s in enumerate(self.study_of_video):
            if not seen[s]:
                seen[s] = True
                self.patient[s], self.day[s] = split.patient_id[v], float(split.study_day[v])
            if not self.report[s].strip() and split.report[v].strip():
                self.report[s] = split.report[v]
            if not np.isfinite(self.ef[s]) and np.isfinite(split.ef[v]):
                self.ef[s] = float(split.ef[v])

    def frames(self, frame_values: np.ndarray) -> np.ndarray:
        """Frame-wise values of the split [M, ...] in study order (a study's frames: its videos' frames)."""
        return np.asarray(frame_values)[self.frame_index]

    def relevance(self, task: task_table.Task, sims: np.ndarray) -> np.ndarray:
        """Each video's zero-shot relevance to the task (see the module doc), from the split's sims [M, P]."""
        if task.mode == "binary":
            return zs.score_binary(sims, self.video_lengths)
        return zs.video_mean(np.asarray(sims).max(axis=1), self.video_lengths)

    def video_weights(self, task: task_table.Task, sims: np.ndarray) -> np.ndarray:
        """Weight [N] of each video within its study: softmax of relevance / temperature (sums to 1)."""
        return _softmax_within(self.relevance(task, sims) / self.temperature, self.study_of_video, self.num_studies)

    def frame_weights(self, task: task_table.Task, sims: np.ndarray) -> np.ndarray | None:
        """Per-frame weights [M] in study order for the weighted pool (w_v / T_v), None for the mean."""
        if self.pool == "mean":
            return None
        per_frame = np.repeat(self.video_weights(task, sims) / self.video_lengths, self.video_lengths)
        return self.frames(per_frame)

    def labels(self, task: task_table.Task) -> np.ndarray:
        """One label per study from its report (EF column first where known), NaN = unknown."""
        return task_table.task_labels(task, self.report, {"ef": self.ef})

    def binary_scores(self, task: task_table.Task, sims: np.ndarray) -> np.ndarray:
        """Each study's binary score (the rule of the module doc) from the split's sims [M, P]."""
        return zs.score_binary(self.frames(sims), self.lengths, self.frame_weights(task, sims))


class StudyMetrics:
    """Collects the study-level block of one checkpoint's results, task by task (sims computed once by the
    caller for both levels), then retrieval and patient identification (`finish`)."""

    def __init__(self, split, *, pool: str = "mean", temperature: float = TEMPERATURE, calibration=None):
        self.studies = Studies(split, pool=pool, temperature=temperature)
        self.calibration = Studies(calibration, pool=pool, temperature=temperature) if calibration is not None else None
        st = self.studies
        self.results: dict = {
            "num_studies": st.num_studies,
            "num_videos": int(len(st.study_of_video)),
            "num_frames": int(st.lengths.sum()),
            "videos_per_study": _summary(st.videos_per_study),
            "frames_per_study": _summary(st.lengths),
            "pool": pool,
            "tasks": {},
            "clinical_change": {},
        }
        if pool == "weighted":
            self.results["pool_temperature"] = st.temperature
        self.curves: dict = {"binary": {}, "regression": {}}

    def add_task(self, task: task_table.Task, sims: np.ndarray, calibration_sims: np.ndarray | None = None) -> None:
        """One zero-shot task at study level; `calibration_sims` [M', P] of the calibration split (binary)."""
        st = self.studies
        labels = st.labels(task)
        calib = None
        if self.calibration is not None and calibration_sims is not None and task.mode == "binary":
            c_labels = self.calibration.labels(task)
            known = np.isfinite(c_labels)
            if len(np.unique(c_labels[known])) == 2:
                calib = (c_labels[known].astype(int), self.calibration.binary_scores(task, calibration_sims)[known])
        out = zs.evaluate_task(
            task, st.frames(sims), labels, lengths=st.lengths, calibration=calib, weights=st.frame_weights(task, sims)
        )
        curve = out.pop("_curves", None)
        if curve is not None:
            self.curves["binary" if task.mode == "binary" else "regression"][task.name] = curve
        self.results["tasks"][task.name] = out
        if task.mode == "binary":
            ids = np.arange(st.num_studies)
            self.results["clinical_change"][task.name] = metrics.clinical_change(
                st.embeddings, st.patient, ids, st.day, np.nan_to_num(labels)
            )

    def finish(self, embed_texts, *, retrieval_chunk: int = 1024) -> tuple[dict, dict]:
        """(results, curves) of the study block: the tasks so far, retrieval (study embedding vs its report
        embedding, studies with a report, at least 2) and patient identification between studies."""
        st = self.studies
        has_report = np.asarray([bool(r.strip()) for r in st.report])
        if has_report.sum() >= 2:
            report_embeds = embed_texts([r for r, h in zip(st.report, has_report) if h])
            self.results["retrieval"] = metrics.retrieval_metrics(
                st.embeddings[has_report], report_embeds, chunk_size=retrieval_chunk
            )
        pid = metrics.patient_identification(st.embeddings, st.patient, np.arange(st.num_studies))
        self.curves["patient_identification"] = {"labels": pid.pop("labels"), "scores": pid.pop("scores")}
        self.results["patient_identification"] = pid
        return self.results, self.curves
