"""bench/scaling.py's memory accounting: FSDP really divides the train state over the 8-device mesh."""

import pathlib

import jax
import pytest

from echoclip_jax.config import files
from echoclip_jax.runtime import sharding
from echoclip_jax.training import step as step_lib

from .conftest import load_bench

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

scaling = load_bench("scaling")


def abstract_state(config_name, preset):
    c = files.load(CONFIGS / f"{config_name}.py")
    c.sharding_preset = preset
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = scaling.mesh_for(preset, jax.device_count())
    return step_lib.build_train_step(c, sharding.build_mesh(c.mesh), 100).abs_state


@pytest.mark.parametrize("config_name", ["tiny", "echoclip"])
def test_fsdp_divides_state_over_8_devices(config_name):
    assert jax.device_count() == 8
    total, per_device = scaling.state_bytes(abstract_state(config_name, "fsdp"))
    assert per_device <= 1.2 * total / 8, (per_device, total / 8)


def test_dp_replicates_state():
    total, per_device = scaling.state_bytes(abstract_state("tiny", "dp"))
    assert per_device == total


def test_mesh_for_uses_every_device():
    for preset in scaling.PRESETS:
        for n in (1, 2, 4, 8):
            d, f, t = scaling.mesh_for(preset, n)
            assert d * f * t == n
    with pytest.raises(ValueError, match="unknown preset"):
        scaling.mesh_for("zero3", 8)
