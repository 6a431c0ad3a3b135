"""bench/towers.py times the same network in both frameworks: equal weights give equal tower losses."""

import numpy as np
import pytest

from .conftest import load_bench


def test_ours_and_open_clip_towers_compute_the_same_losses():
    pytest.importorskip("open_clip")
    towers = load_bench("towers")
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
