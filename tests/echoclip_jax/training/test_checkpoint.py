"""Checkpointer: state + data iterator saved together, restore onto another mesh, keep-N + best,
half-written steps ignored, debris that cannot be deleted does not stop a save, restore_params without an
optimizer, SIGTERM flag."""

import errno
import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from echoclip_jax.runtime import sharding
from echoclip_jax.training import checkpoint


def _mesh(data, fsdp, devices=None):
    return sharding.build_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=1)), devices)


def _state(mesh):
    w = jnp.arange(64.0).reshape(8, 8)
    return {
        "step": jnp.int32(3),
        "params": {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp", None))), "logit_scale": jnp.float32(2.5)},
        "rng": jax.random.key_data(jax.random.key(0)),
    }


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
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh2, P())), _state(mesh8)
    )
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


def test_debris_of_a_killed_save_that_cannot_be_deleted_does_not_stop_the_resave(tmp_path, monkeypatch, project_logs):
    """Issue 20. A save of step 2 killed midway left Orbax's temporary directory, and deleting it fails (as when
    something still writes into it or holds a file open): `rmtree` raises ENOTEMPTY. The next Checkpointer must
    still save step 2, which needs that very temporary name, and say what it could not delete. With Orbax's
    own cleanup (background, its error raised by the first save) this save raised the OSError."""
    mesh = _mesh(1, 8)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=3)
    ck.save(1, _state(mesh), _iterator())
    ck.wait()
    ck.close()
    ckdir = tmp_path / "checkpoints"
    data_dir = ckdir / "2.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp" / "d"
    os.makedirs(data_dir)
    (data_dir / "f04c3b29").write_bytes(b"half a chunk")

    real_rmtree = shutil.rmtree

    def rmtree_failing_on_debris(path, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in str(path) or checkpoint.DEBRIS_PREFIX in str(path):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), "d")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_failing_on_debris)
    ck = checkpoint.Checkpointer(str(tmp_path), keep=3)
    ck.save(2, _state(mesh), _iterator())
    ck.wait()
    ck.close()
    assert checkpoint.all_steps(str(tmp_path)) == [1, 2]
    assert float(checkpoint.restore_params(str(tmp_path), step=2)["logit_scale"]) == 2.5
    left = [n for n in os.listdir(ckdir) if n.startswith(checkpoint.DEBRIS_PREFIX)]
    assert len(left) == 1 and not any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckdir)), os.listdir(ckdir)
    (warning,) = [m for m in project_logs if "delete it by hand" in m]
    assert str(ckdir / left[0]) in warning and "delete it by hand" in warning and "Directory not empty" in warning

    monkeypatch.setattr(shutil, "rmtree", real_rmtree)  # deletable again: the next start removes it
    assert checkpoint.remove_unfinished_saves(str(ckdir)) == left
    assert sorted(os.listdir(ckdir)) == ["1", "2"]


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
