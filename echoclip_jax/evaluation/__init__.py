"""Evaluation: zero-shot tasks as data, metrics in plain numpy, study-level answers over a study's views, and
what an evaluation writes (JSON, summary.csv, TensorBoard scalars, plots).
"""
