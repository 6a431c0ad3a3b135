"""Configuration: the defaults every experiment starts from, the one start-up check of a whole config,
the rule that decides which model config describes a set of weights, and the zero-shot task table
(`zero_shot_tasks.json`, package data).
"""
