"""Model weights: the one loader (`KIND:PATH[@STEP]` -> model config and parameters) and the open_clip
state-dict layout, both ways.
"""
