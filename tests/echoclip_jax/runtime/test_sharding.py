"""Mesh construction and the logical-axis rule presets of echoclip_jax.runtime.sharding."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from echoclip_jax.runtime import sharding


def _mesh(data, fsdp, tensor, devices=None):
    return sharding.build_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices)


def test_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = _mesh(-1, 2, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(_mesh(1, 1, -1, jax.devices()[:2]).shape) == {"data": 1, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize("sizes", [(3, -1, 1), (2, 2, 1), (-1, -1, 1), (0, 8, 1)])
def test_bad_mesh_is_a_clear_error(sizes):
    with pytest.raises(ValueError, match="config.mesh"):
        _mesh(*sizes)


def test_presets_map_logical_names():
    mesh = _mesh(2, 2, 2)
    shape = (64, 128)
    assert sharding.logical_to_spec(("embed", "mlp"), shape, mesh, sharding.get_rules("dp")) == P(None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), shape, mesh, sharding.get_rules("fsdp")) == P("fsdp", None)
    assert sharding.logical_to_spec(("embed", "mlp"), shape, mesh, sharding.get_rules("fsdp_tp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), shape, mesh, sharding.get_rules("fsdp_tp")) == P(
        "tensor", "fsdp"
    )
    assert sharding.logical_to_spec((), (), mesh, sharding.get_rules("fsdp_tp")) == P()
    with pytest.raises(ValueError, match="sharding_preset"):
        sharding.get_rules("zero4")


def test_non_divisible_or_reused_axes_fall_back_to_replication():
    mesh = _mesh(1, 4, 2)
    rules = sharding.get_rules("fsdp_tp")
    assert sharding.logical_to_spec(("embed", "mlp"), (6, 8), mesh, rules) == P(None, "tensor")
    assert sharding.logical_to_spec(("embed", "embed"), (8, 8), mesh, rules) == P("fsdp", None)
    assert sharding.logical_to_spec((None, None, "embed"), (7, 7, 8), mesh, rules) == P(None, None, "fsdp")


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.w = nnx.Param(init(rngs.params(), (8, 16)), out_sharding=("embed", "mlp"), eager_sharding=False)
        self.b = nnx.Param(jnp.zeros(16), out_sharding=("mlp",), eager_sharding=False)


def test_param_and_optimizer_state_shardings_follow_the_params():
    mesh = _mesh(2, 2, 2)
    state = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    sh = sharding.param_shardings(state, mesh, sharding.get_rules("fsdp_tp"))
    assert sh["w"].spec == P("fsdp", "tensor") and sh["b"].spec == P("tensor")
    params = nnx.to_pure_dict(state)
    opt = jax.eval_shape(optax.adamw(1e-3).init, params)
    osh = sharding.like_params(opt, params, sh, mesh)
    adam = osh[0]
    assert adam.mu["w"].spec == P("fsdp", "tensor") and adam.nu["b"].spec == P("tensor")
    assert adam.count.spec == P()
    placed = jax.device_put(params, sh)
    assert placed["w"].addressable_shards[0].data.shape == (4, 8)
    np.testing.assert_array_equal(np.asarray(placed["w"]), np.asarray(params["w"]))
