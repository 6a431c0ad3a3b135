"""bench/towers.py times the same network in both frameworks: equal weights give equal tower losses."""
import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(REPO, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ours_and_open_clip_towers_compute_the_same_losses():
    pytest.importorskip("open_clip")
    towers = load("towers")
    config = towers.load_config("tiny", 2, "float32", "auto")
    config.model.vision.image_size = 32
    batch = towers.synthetic_batch(config)
    ours, params = towers.jax_tower_fns(config, batch)
    theirs = towers.torch_tower_fns(config, batch, params)
    assert set(ours) == set(theirs) == {"text fwd", "text fwd+bwd", "image fwd", "image fwd+bwd"}
    for part in ("text fwd", "image fwd"):
        np.testing.assert_allclose(float(ours[part]()), theirs[part](), rtol=1e-4, atol=1e-4)
    log = []
    towers.with_cpu_time(theirs["text fwd+bwd"], log)()
    assert len(log) == 1 and log[0] >= 0
