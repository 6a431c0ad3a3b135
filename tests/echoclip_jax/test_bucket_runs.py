"""Training runs whose workdir is a bucket (gs://, a real GCS server on 127.0.0.1): a pod slice's hosts share
nothing but the bucket, and a preempted VM loses its disk, so exact resume has to hold there.

A SIGKILL while a save is being written, then the same command again: the run resumes from the last step
whose save was committed and ends bit-identical to an uninterrupted local run; the same with two processes
(jax.distributed) sharing the gs:// workdir; the server stopped during a save and started again; an
`evaluate --watch` job beside a training job, both on the bucket. Run helpers come from test_reliability."""

import csv
import io
import os
import re
import signal
import subprocess
import sys
import time

import fsspec
import jax
import numpy as np
import pytest

from echoclip_jax.runtime import storage
from echoclip_jax.training import checkpoint

from .conftest import KILL_RUN, REPO, free_port, run_train, tiny_overrides
from .test_reliability import HEARTBEAT, _assert_each_step_repeats_bit_for_bit, _resumed_at, _rows, _Run


def _objects(prefix: str) -> list[str]:
    """Every object below a gs:// prefix (one listing request, never cached)."""
    fs = fsspec.filesystem("gs")
    try:
        return fs.find(prefix)
    except FileNotFoundError:
        return []


def _writing(step: int):
    """A run's condition: step `step`'s save has array objects in the bucket and is not committed yet."""

    def cond(workdir, _skip) -> bool:
        names = _objects(f"{checkpoint.checkpoint_dir(workdir)}/{step}/")
        return any("/state/" in n for n in names) and not any(n.endswith(checkpoint.COMMIT_FILE) for n in names)

    return cond


def _assert_ends_as(workdir, uninterrupted):
    params, rows = uninterrupted
    for a, b in zip(jax.tree.leaves(checkpoint.restore_params(workdir)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    got = _rows(workdir)
    assert got[-1]["step"] == 8, got
    return _assert_each_step_repeats_bit_for_bit(got, rows)


@pytest.mark.slow
def test_sigkill_during_a_bucket_save_then_resume_is_bit_identical(records_dir, bucket, tmp_path, uninterrupted):
    wd = f"{bucket}/run"
    run = _Run(records_dir, wd, tmp_path / "killed.log")
    run.signal_when(_writing(4), signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert checkpoint.all_steps(wd) == [2]  # step 4's objects are there, but not committed: never listed
    assert _objects(f"{checkpoint.checkpoint_dir(wd)}/4/")

    log = run_train(records_dir, wd, *KILL_RUN).stderr
    assert _resumed_at(log) == 2, log[-3000:]
    assert f"removed {checkpoint.checkpoint_dir(wd)}/4, left by a save that did not finish" in log, log[-3000:]
    assert checkpoint.all_steps(wd) == [4, 6, 8]
    _assert_ends_as(wd, uninterrupted)
    assert storage.listdir(f"{wd}/tensorboard")  # the events file is in the bucket too


@pytest.mark.slow
def test_two_processes_share_a_bucket_workdir_killed_mid_save_then_resume(records_dir, bucket, tmp_path):
    """Two processes (2 CPU devices each, jax.distributed on 127.0.0.1) write one gs:// workdir; process 1
    is SIGKILLed while step 4's save is being written, process 0 exits (its peer is gone); both restart,
    resume from step 2 and end bit-identical to an uninterrupted two-process run on local disk."""
    wd = f"{bucket}/run2p"

    def start(name, workdir=wd):
        port = free_port()
        return [
            _Run(records_dir, workdir, tmp_path / f"{name}{i}.log", processes=2, process_id=i, port=port)
            for i in range(2)
        ]

    local = str(tmp_path / "local")
    for r in start("uninterrupted", local):
        assert r.wait(timeout=600) == 0, r.output()[-3000:]
    uninterrupted = checkpoint.restore_params(local), _rows(local)

    runs = start("killed")
    try:
        runs[1].signal_when(_writing(4), signal.SIGKILL)
        assert runs[1].wait() == -signal.SIGKILL
        assert runs[0].wait(timeout=4 * HEARTBEAT) != 0
    finally:
        for r in runs:
            r.wait(timeout=1)
    assert checkpoint.all_steps(wd) == [2]
    runs = start("restarted")
    for r in runs:
        assert r.wait(timeout=600) == 0, r.output()[-3000:]
        assert _resumed_at(r.output()) == 2
    assert checkpoint.all_steps(wd) == [4, 6, 8]
    names = _objects(f"{checkpoint.checkpoint_dir(wd)}/8/data/")
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.endswith(".json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    _assert_ends_as(wd, uninterrupted)


@pytest.mark.slow
def test_server_down_during_a_save_never_restores_a_half_written_step(
    records_dir, gcs_server, bucket, tmp_path, uninterrupted
):
    """The bucket's server stops while step 4's save is being written and starts again 5 s later (the same
    objects). The run either rides it out (the clients retry) or stops with an error naming the checkpoint;
    the same command then resumes from the last committed step, and the run ends bit-identical to the
    uninterrupted one."""
    wd = f"{bucket}/run"
    run = _Run(records_dir, wd, tmp_path / "outage.log")
    run.signal_when(_writing(4), 0)  # signal 0: only wait for the phase
    gcs_server.stop()
    time.sleep(5)
    gcs_server.start()
    status = run.wait(timeout=600)
    out = run.output()
    if status != 0:
        assert "echoclip_jax.train: error:" in out and "checkpoints" in out, out[-3000:]
    committed = checkpoint.all_steps(wd)
    for s in committed:  # only committed steps are listed
        assert any(n.endswith(checkpoint.COMMIT_FILE) for n in _objects(f"{checkpoint.checkpoint_dir(wd)}/{s}/"))
    if status != 0:
        log = run_train(records_dir, wd, *KILL_RUN).stderr
        assert _resumed_at(log) == max(committed), log[-3000:]
    print(f"outage during step 4's save: the run {'continued' if status == 0 else 'stopped'}: {out[-600:]}")
    _assert_ends_as(wd, uninterrupted)


@pytest.mark.slow
def test_evaluate_watch_beside_training_evaluates_every_checkpoint_once(records_dir, bucket, tmp_path):
    """The pod pattern: a training job and an `evaluate --watch` job started together on one gs:// workdir.
    The watcher evaluates each checkpoint (2, 4, 6, 8) exactly once as it is committed, writes its results to
    a gs:// --out, and exits 0 after the final step."""
    wd, out = f"{bucket}/run", f"{bucket}/eval"
    keep = ("--config.keep_checkpoints=10",)
    train = _Run(records_dir, wd, tmp_path / "train.log", *keep)
    overrides = [f"--config.{k}={v}" for k, v in tiny_overrides(records_dir).items()]
    args = [sys.executable, "-m", "echoclip_jax.evaluate", "--config", os.path.join(REPO, "configs", "tiny.py")]
    args += [*overrides, *KILL_RUN, *keep, "--workdir", wd, "--watch", "--watch_poll_s=1", "--watch_timeout_s=600"]
    args += ["--data_dir", records_dir, "--split", "val", "--out", out, "--tasks", "ef,pacemaker", "--batch_size=16"]
    with open(tmp_path / "watch.log", "w") as log:
        watcher = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ})
        try:
            assert train.wait(timeout=900) == 0, train.output()[-3000:]
            assert watcher.wait(timeout=900) == 0, (tmp_path / "watch.log").read_text()[-3000:]
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
    said = (tmp_path / "watch.log").read_text()
    for step in (2, 4, 6, 8):
        assert len(re.findall(rf"evaluate {step} \(orbax:", said)) == 1, said[-3000:]
        assert storage.load_json(f"{out}/{step}.json")["step"] == step
    assert "evaluated 4 checkpoint(s) as they appeared" in said
    assert [r["step"] for r in csv.DictReader(io.StringIO(storage.read_text(f"{out}/summary.csv")))] == [
        "2",
        "4",
        "6",
        "8",
    ]
