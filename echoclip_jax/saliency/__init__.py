"""Saliency maps: where in a frame the image supports a text prompt (PromptCAM, input gradients), where a
map may and should point (the scan sector, truth masks in the model's pixels), and maps scored against
the truth.
"""
