"""Evaluation: the zero-shot task table (tasks as data, prompts, labels from reports), zero-shot scoring,
metrics in plain numpy, study-level answers over a study's views, sweeps over checkpoints, and what an
evaluation writes (JSON, summary.csv, TensorBoard scalars, plots).
"""
