"""Which model config describes a checkpoint (echoclip_jax.config.model): one rule for convert, evaluate,
embed, interpret and train's init, and conversions verified in float32 whatever the compute dtype."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from echoclip_jax import models
from echoclip_jax.config import files
from echoclip_jax.config import model as mcfg
from echoclip_jax.runtime import sharding
from echoclip_jax.training import step as step_lib
from echoclip_jax.weights import conversion
from echoclip_jax.weights import loader as weights
from echoclip_jax.weights import open_clip as ocw

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def small(dtype="float32"):
    """configs/tiny.py's model, smaller, computing in `dtype`."""
    mc = files.load(CONFIGS / "tiny.py").model
    mc.vision.image_size, mc.vision.depthwise_impl, mc.embed_dim, mc.dtype = 32, "lax", 32, dtype
    mc.text.layers, mc.text.width, mc.text.heads = 1, 32, 2
    return mc


def random_params(mc, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s.shape) * 0.05).astype(s.dtype) for k, s in weights.expected_params(mc).items()}


def test_stored_architecture_with_run_settings_from_the_config(tmp_path):
    stored = small("bfloat16")
    path = tmp_path / "m.safetensors"
    conversion.save(f"safetensors:{path}", stored, random_params(stored))
    given = small("float32")
    given.vision.drop_path_rate = 0.3
    mc, _ = weights.load(f"safetensors:{path}", given)
    assert mc.dtype == "float32" and mc.vision.drop_path_rate == 0.3  # run settings: --config
    mc, _ = weights.load(f"safetensors:{path}")  # no --config: the stored architecture, default run settings
    assert mcfg.architecture(mc) == mcfg.architecture(stored) and mc.dtype == "float32"

    other = small()
    other.text.width = 64
    with pytest.raises(ValueError) as e:
        weights.load(f"safetensors:{path}", other)
    msg = str(e.value)
    assert str(tmp_path / "m.json") in msg and "model.text.width = 32" in msg and "has 64" in msg
    assert "--config.model.text.width=32" in msg
    bias = small()
    bias.init_logit_bias = -10.0
    with pytest.raises(ValueError, match="model.init_logit_bias"):
        weights.load(f"safetensors:{path}", bias)
    os.remove(tmp_path / "m.json")
    with pytest.raises(ValueError, match=r"m\.safetensors: carries no model config; pass --config"):
        weights.load(f"safetensors:{path}")


def test_bfloat16_compute_config_converts_to_every_kind_and_back(tmp_path):
    """The issue's failure at a small scale: a bf16-compute config through every destination kind and back;
    each verification compares weights in float32 (identical weights: zero difference)."""
    mc = small("bfloat16")
    params = random_params(mc)
    src = f"open_clip:{tmp_path / 'oc.safetensors'}"
    ocw.write_state_dict(ocw.export_state_dict(params, mc), str(tmp_path / "oc.safetensors"))
    chain = [
        src,
        f"safetensors:{tmp_path / 'a.safetensors'}",
        f"open_clip:{tmp_path / 'back'}",
        f"params:{tmp_path / 'p'}",
        f"safetensors:{tmp_path / 'b.safetensors'}",
        f"open_clip:{tmp_path / 'c'}",
    ]
    for a, b in zip(chain, chain[1:]):
        assert conversion.convert(a, b, mc) == {"image": 0.0, "text": 0.0}, (a, b)
    for spec in chain[1:]:
        got_mc, got = weights.load(spec, mc)
        assert got_mc.dtype == "bfloat16"  # the run's compute dtype is kept for the run
        assert all(np.array_equal(got[k], params[k]) for k in params), spec


def test_train_init_follows_the_same_rule(tmp_path):
    """train's init reads a params-only export (init.kind=checkpoint) and an open_clip directory through
    weights.load: same weights when the architecture agrees, the same clear error when it does not."""

    config = files.load(CONFIGS / "tiny.py")
    config.model = small("bfloat16")
    params = random_params(config.model, seed=3)
    conversion.save(f"params:{tmp_path / 'p'}", small("float32"), params)  # stored: another compute dtype
    abstract = nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0)))
    state = nnx.split(abstract, nnx.Param, ...)[1]
    mesh = sharding.build_mesh(config.mesh)
    shardings = sharding.param_shardings(state, mesh, sharding.get_rules("dp"))
    config.init.kind, config.init.path = "checkpoint", str(tmp_path / "p")
    got = step_lib.initial_params(config, nnx.to_pure_dict(state), shardings)
    flat = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.State(got))}
    assert all(np.array_equal(flat[k], params[k]) for k in params)
    assert len(jax.tree.leaves(got)) == len(params)

    conversion.save(f"open_clip:{tmp_path / 'oc'}", config.model, params)
    config.init.kind, config.init.path = "open_clip", str(tmp_path / "oc")
    config.model.embed_dim = 64
    with pytest.raises(ValueError, match=r"open_clip_config.json: the stored model config has model.embed_dim = 32"):
        step_lib.initial_params(config, nnx.to_pure_dict(state), shardings)


def test_evaluate_embed_and_interpret_clis_name_a_mismatch(tmp_path):
    """Every CLI that loads weights fails the same way on a --config that contradicts the stored one."""
    mc = files.load(CONFIGS / "tiny.py").model
    mc.text.layers = 2
    path = tmp_path / "m.safetensors"
    conversion.save(f"safetensors:{path}", mc, random_params(mc))
    np.save(tmp_path / "x.npy", np.zeros((1, 64, 64, 3), np.uint8))
    common = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--checkpoint", f"safetensors:{path}"]
    commands = {
        "embed": [*common, "--images", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o.npy")],
        "interpret": [*common, "--video", str(tmp_path / "x.npy"), "--prompt", "P", "--out", str(tmp_path / "i")],
        "evaluate": [*common, "--data_dir", str(tmp_path), "--out", str(tmp_path / "e")],
    }
    for name, args in commands.items():
        r = subprocess.run(
            [sys.executable, "-m", f"echoclip_jax.{name}", *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert r.returncode != 0, name
        assert "m.json: the stored model config has model.text.layers = 2, --config has 4" in r.stderr, (
            name,
            r.stderr[-2000:],
        )
