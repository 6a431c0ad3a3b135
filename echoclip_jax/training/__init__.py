"""Training: losses over the global batch, the optimiser, checkpoints saved with the data position, and the
train step compiled for a TPU slice without one (with the reading of its optimized HLO).
"""
