"""The demo: the whole pipeline on a synthetic cohort whose truth is known, and what is measured against it.

`python -m echoclip_jax.demo` runs every stage as a user would (`pipeline`); the cohort's truth becomes the
probes' labels (`labels`) and the saliency scores' device masks (`device_masks`), and every headline figure is
tabled beside the baseline it has to beat (`results_table`). The only library package that reads
`data_prep.synthetic`.
"""
