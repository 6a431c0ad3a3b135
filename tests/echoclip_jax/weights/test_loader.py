"""The one weights loader: the KIND:PATH[@STEP] grammar every command takes, and what it reads."""

import pathlib

import numpy as np
import pytest

from echoclip_jax.config import files
from echoclip_jax.weights import conversion
from echoclip_jax.weights import loader as weights

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"


def test_spec_grammar(tmp_path):
    assert weights.parse("orbax:/runs/a@200") == weights.Spec("orbax", "/runs/a", 200)
    assert weights.parse("orbax:/runs/a") == weights.Spec("orbax", "/runs/a", None)
    assert str(weights.parse("orbax:/runs/a@200")) == "orbax:/runs/a@200"
    odd = tmp_path / "model@3.safetensors"  # an existing path that contains @ is a path, not a step
    odd.write_bytes(b"")
    assert weights.parse(f"safetensors:{odd}") == weights.Spec("safetensors", str(odd))
    with pytest.raises(ValueError, match="safetensors weights have no steps"):
        weights.parse("safetensors:/x/m@3")
    with pytest.raises(ValueError, match="expected KIND:PATH with KIND one of open_clip, safetensors, orbax, params"):
        weights.parse("pickle:/x")
    with pytest.raises(ValueError, match="expected KIND:PATH"):
        weights.parse("/just/a/path")
    with pytest.raises(ValueError, match="KIND one of open_clip, safetensors, params"):
        weights.parse(f"orbax:{tmp_path}", conversion.DEST_KINDS)


def test_nested_is_the_inverse_of_flat_names():
    flat = {
        ("vision", "stem", 0, "kernel"): np.zeros(2),
        ("vision", "stem", 0, "bias"): np.ones(1),
        ("logit_scale",): np.float32(1),
    }
    tree = weights.nested(flat)
    assert tree["vision"]["stem"][0]["bias"] is flat[("vision", "stem", 0, "bias")]
    assert set(weights.nested(flat, string_keys=True)["vision"]["stem"]) == {"0"}
    assert weights.flat_name(("vision", "stem", 0, "kernel")) == "vision/stem/0/kernel"


def test_params_only_checkpoint_has_no_steps(tmp_path):
    mc = files.load(CONFIGS / "tiny.py").model
    params = {k: np.zeros(s.shape, s.dtype) for k, s in weights.expected_params(mc).items()}
    conversion.save(f"params:{tmp_path / 'p'}", mc, params)
    with pytest.raises(ValueError, match="params-only checkpoint has no steps; drop @3"):
        weights.load(weights.Spec("orbax", str(tmp_path / "p"), 3), mc)
