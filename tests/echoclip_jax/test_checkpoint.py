"""Checkpointer: state + data iterator saved together, restore onto another mesh, keep-N + best,
half-written steps ignored, restore_params without an optimizer, SIGTERM flag."""
import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from echoclip_jax import checkpoint, sharding


def _mesh(data, fsdp, devices=None):
    return sharding.build_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=1)), devices)


def _state(mesh):
    w = jnp.arange(64.0).reshape(8, 8)
    return {"step": jnp.int32(3), "params": {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp", None))),
                                             "logit_scale": jnp.float32(2.5)},
            "rng": jax.random.key_data(jax.random.key(0))}


def _iterator():
    return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def test_state_and_iterator_restore_onto_another_mesh(tmp_path):
    mesh8 = _mesh(1, 8)
    it = _iterator()
    for _ in range(3):
        next(it)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
    ck.save(3, _state(mesh8), it)
    expected_next = next(it)  # advancing during the async save must not change what is saved
    ck.wait()
    ck.close()

    mesh2 = _mesh(1, 2, jax.devices()[:2])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh2, P())),
                          _state(mesh8))
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh2, P("fsdp", None)))
    fresh = _iterator()
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
    restored = ck.restore(3, target, fresh)
    ck.close()
    assert restored["params"]["w"].sharding.mesh.devices.size == 2
    assert restored["params"]["w"].addressable_shards[0].data.shape == (4, 8)
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(64.0).reshape(8, 8))
    np.testing.assert_array_equal(next(fresh), expected_next)
    assert int(restored["step"]) == 3


def test_keeps_last_k_plus_best_and_ignores_half_written_steps(tmp_path):
    mesh = _mesh(1, 8)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric="val/recall_at_1")
    for step, recall in [(1, 0.2), (2, 0.9), (3, 0.3), (4, 0.4), (5, 0.1)]:
        ck.save(step, _state(mesh), _iterator(), metrics={"val/recall_at_1": recall})
        ck.wait()
    ck.close()
    assert checkpoint.all_steps(str(tmp_path)) == [2, 4, 5]
    # a save killed mid-write leaves only a temporary directory: never listed, never restored
    os.makedirs(tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234" / "state")
    assert checkpoint.latest_step(str(tmp_path)) == 5
    assert checkpoint.latest_step(str(tmp_path / "nothing-here")) is None


def test_restore_params_reads_weights_only(tmp_path):
    mesh = _mesh(1, 8)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        s = _state(mesh)
        s["params"]["logit_scale"] = jnp.float32(step)
        s["opt_state"] = {"mu": s["params"]}
        ck.save(step, s, _iterator())
        ck.wait()
    ck.close()
    latest = checkpoint.restore_params(str(tmp_path))
    assert set(latest) == {"w", "logit_scale"} and isinstance(latest["w"], np.ndarray)
    assert float(latest["logit_scale"]) == 2.0
    assert float(checkpoint.restore_params(str(tmp_path), step=1)["logit_scale"]) == 1.0
    assert float(checkpoint.restore_params(str(tmp_path / "checkpoints" / "1"))["logit_scale"]) == 1.0
    with pytest.raises(FileNotFoundError, match="step 7"):
        checkpoint.restore_params(str(tmp_path), step=7)
    with pytest.raises(FileNotFoundError, match="no completed checkpoint"):
        checkpoint.restore_params(str(tmp_path / "empty"))


def test_sigterm_sets_the_preemption_flag():
    pre = checkpoint.Preemption()
    try:
        assert not pre.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert pre.agreed()
    finally:
        pre.restore_handler()
