"""Batch-local layers on a mesh: the same values and gradients as without one, whatever the implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echoclip_jax.models import backend
from echoclip_jax.models.depthwise_conv import depthwise_conv2d


@pytest.mark.parametrize("impl", ["shifted", "matmul", "lax"])
def test_depthwise_conv_gradients_on_a_data_fsdp_mesh_equal_the_unsharded_ones(impl):
    """The kernel enters the per-device computation whole and its gradient is summed over the batch axes,
    also through the custom VJPs (`shifted`), as in the echoclip config's FSDP train step."""
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 14, 14, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(7, 7, 16)), jnp.float32)

    def loss(x, k):
        y = backend.batch_local(lambda h, w: depthwise_conv2d(h, w, impl=impl), x, k)
        return jnp.sum(y**2)

    ref = jax.grad(loss, argnums=(0, 1))(x, k)
    got = jax.jit(backend.for_mesh(mesh, jax.grad(loss, argnums=(0, 1))))(x, k)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6, atol=2e-6 * float(jnp.abs(a).max()))
