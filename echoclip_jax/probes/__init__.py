"""Probes on frozen embeddings: the attentive probe over a video's or study's frames, and the scores of
every probe beside its baseline.
"""
