"""The one inference helper: weights replicated on every local device, fixed-size batches split over them."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from echoclip_jax.inference.sharded import ShardedModel


class Scale(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.arange(1.0, 4.0))


def test_map_batches_pads_splits_and_drops_the_padding():
    sm = ShardedModel(Scale(), batch_size=5)
    assert sm.num_devices == 8 and sm.batch_size == 8  # rounded up to the devices
    calls = []

    def fn(state, x, offset):
        calls.append(x.shape)  # traced once: every batch has the one fixed shape
        y = x[:, None] * sm.module(state).w[None, :] + offset  # [B, 3]
        return {"rows": y, "sums": y.sum(1)}  # a pytree of outputs

    x = np.arange(19, dtype=np.float32)
    out = sm.map_batches(jax.jit(fn), x, 1.0)
    want = x[:, None] * np.arange(1.0, 4.0)[None, :] + 1.0
    np.testing.assert_allclose(out["rows"], want)
    np.testing.assert_allclose(out["sums"], want.sum(1))
    cols = sm.map_batches(jax.jit(lambda s, b: (b[:, None] * s["w"][None, :]).T), x, out_axis=1)
    np.testing.assert_allclose(cols, (x[:, None] * np.arange(1.0, 4.0)[None, :]).T)
    assert calls == [(8,)]
    assert sm.map_batches(jax.jit(fn), x[:0], 1.0) is None


def test_per_batch_arguments_and_placement():
    sm = ShardedModel(Scale(), batch_size=8)
    seen = []

    def per_batch():
        seen.append(len(seen))
        return (jnp.float32(len(seen)),)

    out = sm.map_batches(jax.jit(lambda s, b, k: b * 0 + k), np.zeros(20, np.float32), per_batch=per_batch)
    np.testing.assert_array_equal(out, np.repeat([1, 2, 3], [8, 8, 4]))  # a fresh argument for each batch
    assert seen == [0, 1, 2]
    placed = sm.put(np.zeros((16, 2), np.float32))
    assert len(placed.addressable_shards) == 8 and placed.addressable_shards[0].data.shape == (2, 2)
    assert all(s.data.shape == (3,) for s in sm.state["w"].value.addressable_shards)  # replicated weights
