"""Reading data_prep's records on the devices' side: grain random access over the indexed TFRecord shards,
the training and evaluation loaders with their exact-resume state, and whole videos for evaluation.
"""
