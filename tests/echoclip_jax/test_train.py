"""End-to-end training on synthetic-cohort TFRecords on the 8-device CPU mesh (+ multi-process, kill and
resume, preemption, and mesh-preset equivalence under @slow)."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from echoclip_jax import checkpoint, train

from .conftest import REPO, tiny_overrides


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir):
    return [m["loss"] for m in _metrics(workdir) if "loss" in m]


def _cli(records_dir, workdir, extra=(), env=None):
    args = [sys.executable, "-m", "echoclip_jax.train", "--config", os.path.join(REPO, "configs", "tiny.py"),
            "--workdir", str(workdir)]
    args += [f"--config.{k}={v}" for k, v in tiny_overrides(records_dir).items()]
    args += list(extra)
    env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return args, env


def test_tiny_trains_and_loss_falls(tiny_config, tmp_path):
    tiny_config.total_steps = 8
    tiny_config.eval_batches = 1
    last = train.train(tiny_config, str(tmp_path))
    losses = _losses(tmp_path)
    assert [m["step"] for m in _metrics(tmp_path) if "loss" in m] == [2, 4, 6, 8]
    assert losses[-1] < losses[0] - 0.2, losses
    row = _metrics(tmp_path)[0]
    for key in ("lr", "logit_scale", "grad_norm", "samples_per_s", "step_time", "tflops_per_device"):
        assert row[key] is not None and row[key] > 0, key
    assert 0.0 <= last["val/recall_at_1"] <= 1.0 and math.isfinite(last["val/loss"])
    assert checkpoint.all_steps(str(tmp_path)) == [4, 8]
    params = checkpoint.restore_params(str(tmp_path))
    assert params["logit_scale"].shape == () and "visual" in params and "text" in params


@pytest.mark.slow
def test_checkpoint_from_eight_devices_continues_on_two(tiny_config, tmp_path):
    tiny_config.total_steps = 8
    tiny_config.eval_batches = 0
    train.train(tiny_config, str(tmp_path))
    params = checkpoint.restore_params(str(tmp_path))
    tiny_config.total_steps = 10
    train.train(tiny_config, str(tmp_path), devices=jax.devices()[:2])
    assert checkpoint.latest_step(str(tmp_path)) == 10
    after = checkpoint.restore_params(str(tmp_path))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(params))]
    assert jax.tree.structure(after) == jax.tree.structure(params) and sum(changed) > len(changed) // 2
    assert _metrics(tmp_path)[-1]["step"] == 10

    # a new run initialised from that checkpoint's weights (lr 0: they come through unchanged)
    tiny_config.init.kind, tiny_config.init.path = "checkpoint", str(tmp_path)
    tiny_config.optim.lr, tiny_config.total_steps = 0.0, 1
    train.train(tiny_config, str(tmp_path / "from_ckpt"), devices=jax.devices()[:2])
    for a, b in zip(jax.tree.leaves(checkpoint.restore_params(str(tmp_path / "from_ckpt"))), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_before_any_checkpoint(tiny_config, tmp_path):
    tiny_config.model.init_logit_scale = float("nan")
    tiny_config.eval_batches = 0
    # One device: this test is about the NaN guard, and XLA's in-process CPU collectives can stall here when
    # the 8 simulated devices share 2 busy cores.
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 0"):
        train.train(tiny_config, str(tmp_path), devices=jax.devices()[:1])
    assert checkpoint.all_steps(str(tmp_path)) == []


def _same_trajectory(a, b, rtol):
    np.testing.assert_allclose(_losses(a), _losses(b), rtol=rtol)


@pytest.mark.slow
def test_dp_fsdp_fsdp_tp_give_the_same_loss_trajectory(tiny_config, tmp_path):
    tiny_config.total_steps = 4
    tiny_config.eval_batches = 0
    runs = {"dp": dict(data=8, fsdp=1, tensor=1), "fsdp": dict(data=2, fsdp=4, tensor=1),
            "fsdp_tp": dict(data=2, fsdp=2, tensor=2)}
    for preset, mesh in runs.items():
        tiny_config.sharding_preset = preset
        for k, v in mesh.items():
            tiny_config.mesh[k] = v
        if preset == "fsdp_tp":
            tiny_config.loss.impl = "ring"
        train.train(tiny_config, str(tmp_path / preset))
    _same_trajectory(tmp_path / "dp", tmp_path / "fsdp", 1e-4)
    _same_trajectory(tmp_path / "dp", tmp_path / "fsdp_tp", 1e-4)


@pytest.mark.slow
def test_nan_skip_policy_skips_the_step(tiny_config, tmp_path):
    tiny_config.model.init_logit_scale = float("nan")
    tiny_config.optim.nan_policy = "skip"
    tiny_config.total_steps = 2
    tiny_config.eval_batches = 0
    last = train.train(tiny_config, str(tmp_path))
    assert last["skipped"] == 1.0
    assert np.isnan(checkpoint.restore_params(str(tmp_path))["logit_scale"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(records_dir, tmp_path):
    extra = ["--config.total_steps=4", "--config.eval_batches=0"]
    args, env = _cli(records_dir, tmp_path / "single", extra)
    subprocess.run(args, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, check=True,
                   capture_output=True, timeout=600)
    port = _free_port()
    procs = []
    for pid in range(2):
        args, env = _cli(records_dir, tmp_path / "multi", extra + [
            f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={pid}"])
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    _same_trajectory(tmp_path / "single", tmp_path / "multi", 1e-5)
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
        os.listdir(tmp_path / "multi" / "checkpoints" / "4" / "data"))
    single = checkpoint.restore_params(str(tmp_path / "single"))
    multi = checkpoint.restore_params(str(tmp_path / "multi"))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _wait_for(cond, proc, timeout=600):
    t = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - t < timeout
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_is_bit_identical(records_dir, tmp_path):
    extra = ["--config.total_steps=12", "--config.eval_batches=0", "--config.log_every_steps=1"]
    args, env = _cli(records_dir, tmp_path / "whole", extra)
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    args, env = _cli(records_dir, killed, extra)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def past_a_checkpoint():  # a completed checkpoint, and training already beyond it
        saved = checkpoint.latest_step(str(killed))
        return saved is not None and os.path.exists(killed / "metrics.jsonl") and max(
            m["step"] for m in _metrics(killed)) > saved

    _wait_for(past_a_checkpoint, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert checkpoint.latest_step(str(killed)) < 12
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    a = checkpoint.restore_params(str(tmp_path / "whole"))
    b = checkpoint.restore_params(str(killed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(records_dir, tmp_path):
    extra = ["--config.total_steps=1000", "--config.checkpoint_every_steps=500", "--config.eval_batches=0",
             "--config.log_every_steps=1"]
    args, env = _cli(records_dir, tmp_path, extra)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: os.path.exists(tmp_path / "metrics.jsonl") and len(_metrics(tmp_path)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    step = checkpoint.latest_step(str(tmp_path))
    assert step is not None and 2 <= step < 500


@pytest.mark.parametrize("script,args,expect", [
    ("local.sh", ["configs/tiny.py", "/tmp/w", "--config.total_steps=3"],
     "-m echoclip_jax.train --config configs/tiny.py --workdir /tmp/w --config.total_steps=3"),
    ("tpu_pod.sh", ["tpu1", "us-central2-b", "configs/echoclip.py", "gs://b/r"],
     "gcloud compute tpus tpu-vm ssh tpu1 --zone us-central2-b --worker=all --command"),
    ("slurm_gpu.sbatch", ["configs/echoclip.py", "/shared/r"],
     "srun --kill-on-bad-exit=1 .venv/bin/python -m echoclip_jax.train --config configs/echoclip.py"),
])
def test_launch_scripts_dry_run_print_the_command(script, args, expect):
    out = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--dry_run", *args], check=True,
                         capture_output=True, text=True).stdout
    assert expect in out
    if script == "tpu_pod.sh":
        assert "echoclip_jax.train" in out and "gs://b/r" in out


def test_init_from_an_open_clip_state_dict(tiny_config, tmp_path):
    from flax import nnx

    from echoclip_jax import convert, models

    source = models.build_model(tiny_config.model, rngs=nnx.Rngs(3))
    flat = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(source, nnx.Param))}
    convert.save(f"open_clip:{tmp_path}/oc.safetensors", tiny_config.model, flat)
    tiny_config.init.kind, tiny_config.init.path = "open_clip", f"{tmp_path}/oc.safetensors"
    abstract = nnx.eval_shape(lambda: models.build_model(tiny_config.model, rngs=nnx.Rngs(0)))
    params_state = nnx.split(abstract, nnx.Param, ...)[1]
    mesh = train.sharding.build_mesh(tiny_config.mesh)
    shardings = train.sharding.param_shardings(params_state, mesh, train.sharding.get_rules("fsdp"))
    got = train.initial_params(tiny_config, nnx.to_pure_dict(params_state), shardings)
    want = nnx.to_pure_dict(nnx.state(source, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6)
