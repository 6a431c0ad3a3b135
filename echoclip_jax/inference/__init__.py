"""Running a trained model: its weights on every local device with fixed-shape sharded batches, and the
embedder of images, texts and videos of any lengths.
"""
