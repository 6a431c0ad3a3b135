"""Issue 9, training half: tests that try to break a run. A corrupt record read by the training loader, a
checkpoint step half-written when an async save was killed, a run SIGKILLed or SIGTERMed at each phase of a
save and restarted (issue 20), a NaN batch in the middle of a run, a peer process SIGKILLed in a two-process
run, and the privacy of every byte the whole pipeline writes.

Whole runs go through `run_train` (conftest): a fresh `python -m echoclip_jax.train` on 2 CPU devices,
bounded by a timeout. Already covered elsewhere (not repeated here): SIGKILL + resume bit-identical and
SIGTERM saves and exits 0 (test_train.py), restore onto another device count (test_checkpoint.py,
test_train.py), a non-finite loss at step 0 (test_train.py)."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from data_prep import records
from data_prep.synthetic import read_phi
from echoclip_jax.data import loader as data
from echoclip_jax.runtime import sharding, storage
from echoclip_jax.training import checkpoint

from .conftest import KILL_RUN, REPO, free_port, read_metrics, run_train, tiny_overrides, train_command, xla_flags


def _mesh():
    return sharding.build_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def _all_finite(params) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------ corrupt records


def _corrupt_copy(records_dir, dst, split="train", which=((0, 2), (1, 3))):
    """The split's shards copied to dst with one byte of the payload of record r of shard s flipped, for
    each (s, r) in `which`; returns [(shard path, byte offset of the damaged record)]."""
    for p in records.list_shards(records_dir, split):
        shutil.copy(p, dst)
        shutil.copy(records.index_path(p), dst)
    shards = records.list_shards(str(dst), split)
    damaged = []
    for s, r in which:
        reader = records.ShardReader(shards[s])
        offset, length = (int(x) for x in reader._load_index()[r])
        reader.close()
        with open(shards[s], "r+b") as f:
            f.seek(offset + 12 + length // 2)  # inside the record's payload: only the data CRC can see it
            byte = f.read(1)[0]
            f.seek(offset + 12 + length // 2)
            f.write(bytes([byte ^ 0x5A]))
        damaged.append((shards[s], offset))
    return damaged


def test_training_loader_names_the_corrupt_shard_and_offset(tiny_config, records_dir, tmp_path):
    ((shard, offset),) = _corrupt_copy(records_dir, tmp_path, which=((1, 3),))
    tiny_config.data_dir = str(tmp_path)
    loader = data.train_loader(tiny_config, _mesh())
    n = len(data.ShardedRecords(str(tmp_path), "train"))
    # every record is read once in the first epoch, so the damaged one is met within ceil(n / B) batches
    with pytest.raises(records.CorruptRecordError) as err:
        for _ in range(-(-n // tiny_config.batch_size)):
            next(loader)
    assert f"{shard}: corrupt at byte offset {offset}: data CRC mismatch" in str(err.value)


def test_training_loader_skips_and_counts_corrupt_records(tiny_config, records_dir, tmp_path):
    clean_config = tiny_config.copy_and_resolve_references()
    damaged = _corrupt_copy(records_dir, tmp_path)
    tiny_config.data_dir = str(tmp_path)
    tiny_config.data.on_corrupt_record = "skip"
    n = len(data.ShardedRecords(str(tmp_path), "train"))
    tiny_config.batch_size = clean_config.batch_size = 8
    epochs = 8 // math.gcd(n, 8)  # whole epochs in whole batches: each record is read exactly `epochs` times
    batches = epochs * n // 8
    tiny_config.total_steps = clean_config.total_steps = batches
    loader, clean = data.train_loader(tiny_config, _mesh()), data.train_loader(clean_config, _mesh())
    differ = 0
    for _ in range(batches):
        got, want = next(loader), next(clean)
        assert got["images"].shape == want["images"].shape and got["tokens"].shape == want["tokens"].shape
        a, b = np.asarray(got["images"]), np.asarray(want["images"])
        differ += int(sum(not np.array_equal(x, y) for x, y in zip(a, b)))
    assert loader.corrupt_skipped == len(damaged) * epochs == differ  # replaced by a good record, nothing else
    assert clean.corrupt_skipped == 0


# -------------------------------------------------------------------------- half-written checkpoints


def test_half_written_checkpoint_step_is_ignored_on_resume(records_dir, tmp_path):
    """Step 8's async save killed midway leaves Orbax's temporary directory with partial contents: the
    resume must use step 4, clean the debris up, and finish bit-identically to the uninterrupted run."""
    run_train(records_dir, tmp_path, "--config.eval_batches=0")
    assert checkpoint.all_steps(str(tmp_path)) == [4, 8]
    whole = checkpoint.restore_params(str(tmp_path))
    ckdir = tmp_path / "checkpoints"
    half = ckdir / "8.orbax-checkpoint-tmp-1700000000000000"
    os.rename(ckdir / "8", half)
    for dirpath, _, files in os.walk(half):  # the killed writer got half of each file out
        for name in files:
            path = os.path.join(dirpath, name)
            os.truncate(path, os.path.getsize(path) // 2)
    assert checkpoint.latest_step(str(tmp_path)) == 4

    log = run_train(records_dir, tmp_path, "--config.eval_batches=0").stderr
    assert any("resumed from" in line and line.endswith("at step 4") for line in log.splitlines()), log[-3000:]
    assert checkpoint.all_steps(str(tmp_path)) == [4, 8] and not half.exists()  # cleaned up, then re-saved
    for a, b in zip(jax.tree.leaves(checkpoint.restore_params(str(tmp_path))), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------ killed while a checkpoint is written (issue 20)

# The runs: the tiny config's 8 steps, a save every 2 (2, 4, 6, 8; 3 kept), a metrics row every step, as
# test_train's SIGKILL runs (the compiled step is shared through the XLA cache). On CPU the loop waits for
# each save, so one save at most is in flight; its phases are seen on disk: the step's row logged, then
# `<step>.orbax-checkpoint-tmp/` with `state.orbax-checkpoint-tmp/` and `data.orbax-checkpoint-tmp/`, array
# files under `ocdbt.process_0/d/` (the async write), the two items renamed, the step renamed `<step>/`.
TMP = checkpoint.TMP_SUFFIX
SAME = ("loss", "grad_norm", "lr", "logit_scale")  # per-step metrics a resumed run must repeat bit for bit

# A prelude for the narrow phases: every rename of step STEP's temporary directories (the finalisation)
# waits PAUSE seconds first, so that the test, watching the disk, kills inside the window it means.
SLOW_RENAMES = """
import os, time
_rename, _slow = os.rename, os.sep + os.environ["SLOW_STEP"] + ".orbax-checkpoint-tmp"
def _paused_rename(src, dst, *args, **kwargs):
    if _slow in os.fspath(src):
        time.sleep(float(os.environ["PAUSE"]))
    return _rename(src, dst, *args, **kwargs)
os.rename = _paused_rename
"""
# Deleting what an unfinished save left fails, as it does when a file in it is still being written or held
# open (a process of the killed run, NFS's `.nfs*` files): shutil.rmtree raises ENOTEMPTY.
FAILING_DEBRIS_DELETE = """
import errno, os, shutil
_rmtree = shutil.rmtree
def _failing_rmtree(path, *args, **kwargs):
    name = os.path.basename(os.fspath(path).rstrip(os.sep))
    if ".orbax-checkpoint-tmp" in name or name.startswith(".unfinished-"):
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), "d")
    return _rmtree(path, *args, **kwargs)
shutil.rmtree = _failing_rmtree
"""
# Every deletion of what an unfinished save left (echoclip_jax.training.checkpoint.remove_unfinished_saves) waits first.
SLOW_DEBRIS_DELETE = """
import os, shutil, time
_rmtree = shutil.rmtree
def _paused_rmtree(path, *args, **kwargs):
    if os.path.basename(os.fspath(path)).startswith(".unfinished-"):
        time.sleep(float(os.environ["PAUSE"]))
    return _rmtree(path, *args, **kwargs)
shutil.rmtree = _paused_rmtree
"""


def _ckdir(workdir) -> str:
    return checkpoint.checkpoint_dir(str(workdir))


def _debris(workdir) -> list[str]:
    """What unfinished saves left: Orbax's temporary directories and ours moved aside."""
    d = _ckdir(workdir)
    names = os.listdir(d) if os.path.isdir(d) else []
    return sorted(n for n in names if TMP in n or n.startswith(checkpoint.DEBRIS_PREFIX))


def _rows(workdir) -> list[dict]:
    """metrics.jsonl's complete rows (read while a run may be writing it), from a local or gs:// workdir."""
    path = storage.join(str(workdir), "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines(keepends=True) if line.endswith("\n")]


def _files_under(path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _phase(name: str, step: int):
    """(condition on a workdir, rows of earlier runs to skip) -> bool: step `step`'s save is at phase `name`."""

    def tmp(wd, *parts):
        return os.path.join(_ckdir(wd), f"{step}{TMP}", *parts)

    def renamed(wd) -> int:  # items of the step finalised (renamed from `<item>.orbax-checkpoint-tmp`)
        return sum(os.path.isdir(tmp(wd, item)) for item in ("state", "data"))

    return {
        "row logged": lambda wd, skip: any(r["step"] == step for r in _rows(wd)[skip:]),  # the save starts next
        "arrays being written": lambda wd, skip: _files_under(tmp(wd, f"state{TMP}", "ocdbt.process_0", "d")) > 0,
        "one item renamed": lambda wd, skip: renamed(wd) == 1,
        "items renamed": lambda wd, skip: renamed(wd) == 2,
        "committed": lambda wd, skip: os.path.isdir(os.path.join(_ckdir(wd), str(step))),
    }[name]


class _Run:
    """`python -m echoclip_jax.train` (KILL_RUN) in the background, its output in a log file."""

    def __init__(
        self, records_dir, workdir, log_path, *extra, prelude="", env=None, processes=1, process_id=0, port=None
    ):
        self.workdir, self.log_path = workdir, log_path
        self.skip = len(_rows(workdir))  # rows of earlier runs
        if processes > 1:
            extra = (
                *extra,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={processes}",
                f"--config.distributed.process_id={process_id}",
                f"--config.distributed.heartbeat_timeout={HEARTBEAT}",
            )
        args, base_env = train_command(records_dir, workdir, *KILL_RUN, *extra, prelude=prelude)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(args, env={**base_env, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log_path) as f:  # written by the process itself
            return f.read()

    def signal_when(self, cond, sig, timeout=300) -> None:
        """Sends `sig` as soon as `cond(workdir, rows to skip)` holds (polled every 2 ms, at most `timeout` s)."""
        t = time.time()
        while not cond(self.workdir, self.skip):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} first:\n{self.output()[-3000:]}"
            assert time.time() - t < timeout, f"not reached in {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.002)
        self.proc.send_signal(sig)

    def wait(self, timeout=300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def _resumed_at(log: str) -> int | None:
    for line in log.splitlines():
        if "resumed from" in line:
            return int(line.rsplit(" ", 1)[1])
    return None


def _assert_each_step_repeats_bit_for_bit(rows, reference=None):
    """Every step logged more than once (trained again after a kill) has the same metrics each time, and the
    same as in `reference` (the uninterrupted run's rows), bit for bit; returns how many rows repeated one."""
    first = {}
    for r in reference or []:
        first[r["step"]] = {k: r[k] for k in SAME}
    repeated = 0
    for r in rows:
        got = {k: r[k] for k in SAME}
        if r["step"] in first:
            assert got == first[r["step"]], (r["step"], got, first[r["step"]])
            repeated += 1
        first.setdefault(r["step"], got)
    return repeated


def _assert_ends_as(workdir, uninterrupted):
    params, rows = uninterrupted
    for a, b in zip(jax.tree.leaves(checkpoint.restore_params(str(workdir))), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert _rows(workdir)[-1]["step"] == 8
    _assert_each_step_repeats_bit_for_bit(_rows(workdir), rows)


def test_sigkill_while_a_save_is_written_then_the_restart_resumes(records_dir, tmp_path):
    """Default-suite variant of issue 20: SIGKILL once step 4's save has array files on disk (its async
    write under way), then the same command again, in which deleting that debris fails (FAILING_DEBRIS_DELETE,
    as when a file in it is still written or held open). The restart must resume from step 2, say what it
    could not delete, save step 4 again (under the temporary name the debris had) and train steps 3 and 4
    again with the same loss, gradient norm, lr and logit scale bit for bit. Before the fix it crashed at
    that first save with the cleanup's `OSError: [Errno 39] Directory not empty: 'd'`."""
    wd = tmp_path / "run"
    run = _Run(records_dir, wd, tmp_path / "killed.log")
    run.signal_when(_phase("arrays being written", 4), signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert _debris(wd) == [f"4{TMP}"] and checkpoint.all_steps(str(wd)) == [2]  # killed mid-save

    log = run_train(records_dir, wd, *KILL_RUN, prelude=FAILING_DEBRIS_DELETE).stderr
    assert _resumed_at(log) == 2, log[-3000:]
    left = _debris(wd)
    assert len(left) == 1 and left[0].startswith(checkpoint.DEBRIS_PREFIX + "4."), left  # moved aside, not deleted
    assert (
        f"{_ckdir(wd)}/{left[0]}: could not delete what an unfinished save left ([Errno 39] Directory not "
        "empty: 'd'); training ignores it and the next start retries"
    ) in log, log[-3000:]
    assert checkpoint.all_steps(str(wd)) == [4, 6, 8]
    rows = _rows(wd)
    assert [r["step"] for r in rows][-6:] == [3, 4, 5, 6, 7, 8]
    assert _assert_each_step_repeats_bit_for_bit(rows) >= 2  # steps 3 and 4, trained before and after the kill
    assert checkpoint.remove_unfinished_saves(_ckdir(wd)) == left and _debris(wd) == []  # the next start's


# (phase of step 4's save, prelude, its environment): each kill ends one run, the next run resumes from step 2
# (from 4 after "committed"); "restart killed mid-cleanup" kills the run that removes the previous kill's debris.
KILL_POINTS = [
    ("row logged", "", {}),
    ("arrays being written", "", {}),
    ("restart killed mid-cleanup", SLOW_DEBRIS_DELETE, {"PAUSE": "2"}),
    ("one item renamed", SLOW_RENAMES, {"SLOW_STEP": "4", "PAUSE": "2"}),
    ("items renamed", SLOW_RENAMES, {"SLOW_STEP": "4", "PAUSE": "2"}),
    ("committed", "", {}),
]


@pytest.mark.slow
def test_sigkill_at_each_phase_of_a_save_then_resume_is_bit_identical(records_dir, tmp_path, uninterrupted):
    """Issue 20: one workdir, SIGKILLed 6 times at successive phases of step 4's save (once while the restart
    removes the previous kill's debris), each time restarted with the same command; the last run ends with the
    uninterrupted run's parameters, every step trained twice repeats its metrics bit for bit, no debris left."""
    wd = tmp_path / "run"
    for i, (point, prelude, env) in enumerate(KILL_POINTS):
        latest = checkpoint.latest_step(str(wd))
        run = _Run(records_dir, wd, tmp_path / f"kill{i}.log", prelude=prelude, env=env)
        if point == "restart killed mid-cleanup":
            prefix = checkpoint.DEBRIS_PREFIX
            run.signal_when(lambda w, _: any(n.startswith(prefix) for n in os.listdir(_ckdir(w))), signal.SIGKILL)
        else:
            run.signal_when(_phase(point, 4), signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL, run.output()[-3000:]
        left, steps = _debris(wd), checkpoint.all_steps(str(wd))
        print(f"killed at {point!r}: steps {steps}, debris {left}")
        if point == "restart killed mid-cleanup":
            assert [n for n in left if n.startswith(checkpoint.DEBRIS_PREFIX)] and steps == [2]
        elif point == "committed":
            assert steps == [2, 4] and left == []
        elif point != "row logged":  # the save may or may not have begun
            assert steps == [2] and left == [f"4{TMP}"], (point, steps, left)
        if i and point != "restart killed mid-cleanup":
            assert _resumed_at(run.output()) == latest, run.output()[-3000:]
    log = run_train(records_dir, wd, *KILL_RUN).stderr
    assert _resumed_at(log) == 4
    assert _debris(wd) == [] and checkpoint.all_steps(str(wd)) == [4, 6, 8]
    _assert_ends_as(wd, uninterrupted)


# A process that saves steps 1, 2, ... through echoclip_jax.training.checkpoint (8 MB each, 2 kept) and checks, when it
# resumes, that the restored state and data iterator are exactly those of the step it resumed from.
SAVER = """
import sys
import grain, jax, jax.numpy as jnp, numpy as np
from echoclip_jax.training import checkpoint

def state(step):
    return {"step": jnp.int32(step), "w": {str(i): jnp.full((256, 1024), step + i / 8, jnp.float32) for i in range(8)}}

ck = checkpoint.Checkpointer(sys.argv[1], keep=2)
it = iter(grain.MapDataset.range(10 ** 6).to_iter_dataset())
start = ck.latest_step() or 0
if start:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
    restored = ck.restore(start, abstract, it)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state(start))):
        np.testing.assert_array_equal(a, b)
print("resumed", start, flush=True)
for step in range(start + 1, int(sys.argv[2]) + 1):
    position = int(next(it))
    assert position == step - 1, f"data iterator at {position}, expected {step - 1}"
    ck.save(step, state(step), it)
    ck.wait()
    print("saved", step, flush=True)
ck.close()
"""


def _save_phase(workdir) -> str:
    """Where a SAVER process was when it died, from what it left on disk."""
    names = os.listdir(_ckdir(workdir))
    tmp = [n for n in names if TMP in n]
    if tmp:
        items = os.listdir(os.path.join(_ckdir(workdir), tmp[0]))
        return "mid-write" if any(TMP in n for n in items) and not {"state", "data"} & set(items) else "finalising"
    if len([n for n in names if n.isdigit()]) > 2:
        return "committed, oldest step being deleted"
    return "between saves"


@pytest.mark.slow
def test_sigkill_at_random_moments_of_saves_then_every_restore_is_exact(tmp_path):
    """Issue 20, at random: a SAVER process is SIGKILLed a uniformly random 0-2 s after it resumed, over and
    over for 90 s (at least 10 kills; seeded), so the kills land in every phase of a save and of the deletion
    of the oldest step that follows it. Every restart must resume from the latest complete step with the exact state and
    iterator position; at least 3 kills must land mid-write; a last run saves 2 more steps and leaves no debris."""
    wd, rng, phases = tmp_path / "run", random.Random(20), {}
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags(2)}
    t0 = time.time()
    while time.time() - t0 < 90 or sum(phases.values()) < 10:
        assert time.time() - t0 < 400, phases
        latest = checkpoint.latest_step(str(wd)) or 0
        with open(tmp_path / "saver.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", SAVER, str(wd), "1000000"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        _wait_for_line(proc, tmp_path / "saver.log", f"resumed {latest}")
        time.sleep(rng.uniform(0, 2))  # the random moment: nothing to wait for
        assert proc.poll() is None, (tmp_path / "saver.log").read_text()[-3000:]
        proc.kill()
        proc.wait()
        phase = _save_phase(wd)
        phases[phase] = phases.get(phase, 0) + 1
    print(f"{sum(phases.values())} kills in {time.time() - t0:.0f} s: {phases}")
    assert phases.get("mid-write", 0) >= 3, phases
    latest = checkpoint.latest_step(str(wd))
    r = subprocess.run(
        [sys.executable, "-c", SAVER, str(wd), str(latest + 2)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and f"resumed {latest}" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert _debris(wd) == [] and checkpoint.all_steps(str(wd)) == [latest + 1, latest + 2]


def _wait_for_line(proc, log_path, line, timeout=300):
    t = time.time()
    while True:
        text = open(log_path).read()
        if line in text.splitlines():
            return
        assert proc.poll() is None, f"exited {proc.returncode} before printing {line!r}:\n{text[-3000:]}"
        assert time.time() - t < timeout, f"no {line!r} in {timeout} s:\n{text[-3000:]}"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_during_a_save_then_sigkill_during_the_preemption_save(records_dir, tmp_path, uninterrupted):
    """SIGTERM while step 4 is being saved: the run finishes that save, saves step 5 and exits 0. Restarted,
    SIGTERM while step 6 is saved, then SIGKILL (the grace period over) while the preemption save of step 7
    is written. The third run resumes from 6 and ends bit-identical to the uninterrupted run."""
    wd = tmp_path / "run"
    run = _Run(records_dir, wd, tmp_path / "sigterm.log")
    run.signal_when(_phase("arrays being written", 4), signal.SIGTERM)
    assert run.wait() == 0, run.output()[-3000:]
    assert "preempted: saved step 5, exiting" in run.output()
    assert checkpoint.all_steps(str(wd)) == [2, 4, 5] and _debris(wd) == []

    run = _Run(records_dir, wd, tmp_path / "sigterm-sigkill.log")
    run.signal_when(_phase("arrays being written", 6), signal.SIGTERM)
    run.signal_when(_phase("arrays being written", 7), signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert _resumed_at(run.output()) == 5
    assert checkpoint.all_steps(str(wd)) == [4, 5, 6] and _debris(wd) == [f"7{TMP}"]

    log = run_train(records_dir, wd, *KILL_RUN).stderr
    assert _resumed_at(log) == 6 and _debris(wd) == []
    _assert_ends_as(wd, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator", "worker"])
def test_two_processes_one_killed_mid_save_then_both_restart(records_dir, tmp_path, victim):
    """Two processes (2 CPU devices each); one is SIGKILLed while step 4's save is written, the other exits
    (the peer is gone); both are restarted. They resume from step 2, process 0 removes the debris, and steps
    3 and 4, trained twice, repeat their metrics bit for bit."""
    wd = tmp_path / "run"

    def start(name):
        port = free_port()
        return [
            _Run(records_dir, wd, tmp_path / f"{name}{i}.log", processes=2, process_id=i, port=port) for i in range(2)
        ]

    runs = start("killed")
    try:
        runs[victim].signal_when(_phase("arrays being written", 4), signal.SIGKILL)
        assert runs[victim].wait() == -signal.SIGKILL
        t = time.time()
        assert runs[1 - victim].wait(timeout=4 * HEARTBEAT) != 0  # the survivor does not hang
        print(f"survivor exited {time.time() - t:.1f} s after the kill")
    finally:
        for r in runs:
            r.wait(timeout=1)
    assert checkpoint.all_steps(str(wd)) == [2]
    runs = start("restarted")
    for r in runs:
        assert r.wait(timeout=600) == 0, r.output()[-3000:]
        assert _resumed_at(r.output()) == 2
    assert _debris(wd) == [] and checkpoint.all_steps(str(wd)) == [4, 6, 8]
    rows = _rows(wd)
    assert [r["step"] for r in rows][-6:] == [3, 4, 5, 6, 7, 8]
    assert _assert_each_step_repeats_bit_for_bit(rows) >= 2


# --------------------------------------------------------------------------------------- NaN batches


NAN_STEP = 5
# Run before the train CLI: a corrupted image batch (every pixel 255, e.g. a sensor/decoder failure) is
# fed at training step NAN_STEP, and the model's input normalisation is patched so that such a batch
# gives NaN activations, as a real numerical blow-up would.
NAN_BATCH = f"""
import jax, jax.numpy as jnp
from echoclip_jax import models
from echoclip_jax.data import loader as data
preprocess, next_batch, calls = models.preprocess_images, data.Loader.__next__, [0]
models.preprocess_images = lambda x: jnp.where(jnp.all(x == 255), jnp.nan, preprocess(x))
def next_with_a_saturated_batch(self):
    batch = next_batch(self)
    if calls[0] == {NAN_STEP}:
        batch["images"] = jax.device_put(jnp.full(batch["images"].shape, 255, jnp.uint8), batch["images"].sharding)
    calls[0] += 1
    return batch
data.Loader.__next__ = next_with_a_saturated_batch
"""


def test_nan_batch_mid_run_stops_before_any_checkpoint_holds_it(records_dir, tmp_path):
    # checkpoints fall between logged steps: the check must run at each
    r = run_train(
        records_dir,
        tmp_path,
        "--config.checkpoint_every_steps=2",
        "--config.eval_batches=0",
        "--config.log_every_steps=4",
        prelude=NAN_BATCH,
        check=False,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert (
        f"echoclip_jax.train: error: non-finite loss or gradient at step {NAN_STEP}; stopping without applying it "
        "or saving a checkpoint (latest good checkpoint: step 4)"
    ) in r.stderr, r.stderr[-3000:]
    steps = checkpoint.all_steps(str(tmp_path))
    assert steps == [2, 4]  # nothing saved at or after the bad step (index 5 = the 6th update)
    for s in steps:
        assert _all_finite(checkpoint.restore_params(str(tmp_path), step=s)), s


@pytest.mark.slow
def test_nan_batch_mid_run_is_skipped_with_policy_skip(records_dir, tmp_path):
    run_train(
        records_dir,
        tmp_path,
        "--config.checkpoint_every_steps=2",
        "--config.eval_batches=0",
        "--config.log_every_steps=1",
        "--config.optim.nan_policy=skip",
        prelude=NAN_BATCH,
    )
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [float(r["step"] == NAN_STEP + 1) for r in rows]
    assert rows[NAN_STEP]["loss"] is None  # logged as null, not NaN, in metrics.jsonl
    assert checkpoint.all_steps(str(tmp_path))[-3:] == [4, 6, 8]
    for s in checkpoint.all_steps(str(tmp_path)):
        assert _all_finite(checkpoint.restore_params(str(tmp_path), step=s)), s
    assert all(r["loss"] is not None for r in rows[NAN_STEP + 1 :])  # training went on


# -------------------------------------------------------------------------------------- multi-host


HEARTBEAT = 10  # distributed.heartbeat_timeout, seconds


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_peer_killed_mid_run_makes_the_survivor_exit_with_a_clear_error(records_dir, tmp_path, victim):
    """Two processes (2 CPU devices each) on 127.0.0.1; one is SIGKILLed mid-run. The survivor must exit
    non-zero, saying that another process died, within twice the heartbeat timeout: either its collective
    with the dead peer fails (echoclip_jax.train's PeerLostError, at once), or JAX's distributed service
    aborts it (within the heartbeat timeout)."""
    port = free_port()
    extra = [
        "--config.total_steps=1000",
        "--config.checkpoint_every_steps=500",
        "--config.eval_batches=0",
        "--config.log_every_steps=1",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.heartbeat_timeout={HEARTBEAT}",
    ]
    procs = []
    for i in range(2):
        args, env = train_command(records_dir, tmp_path, *extra, f"--config.distributed.process_id={i}")
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        t = time.time()
        while not (os.path.exists(tmp_path / "metrics.jsonl") and len(read_metrics(tmp_path)) >= 2):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            assert time.time() - t < 600
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL)
        t = time.time()
        out = procs[1 - victim].communicate(timeout=120)[0]  # raises TimeoutExpired on a hang
        waited = time.time() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[1 - victim].returncode != 0
    ours = f"process {1 - victim} of 2: a collective with the other processes failed after step"
    jax_service = "JAX distributed service detected fatal errors. This most likely indicates that another task died"
    assert (ours in out and "another process most likely died" in out) or jax_service in out, out[-3000:]
    assert waited < 2 * HEARTBEAT, waited  # bounded by the heartbeat timeout, not by the 1000 steps left
    print(
        f"survivor (process {1 - victim}) exited {procs[1 - victim].returncode} after {waited:.2f} s, "
        f"{'PeerLostError' if ours in out else 'distributed service abort'}"
    )


# ------------------------------------------------------------------------------------------- privacy


def _phi_hits(phi, roots, texts=()):
    """(where, string) for every PHI string found, case-insensitively, in any byte of the files `roots`
    and every file under them, or in the captured `texts` ({name: str}); and the number of files read."""
    needles = sorted({s.lower().encode() for s in phi if s.strip()})
    blobs = dict((name, text.encode()) for name, text in texts.items() if text)
    paths = [str(r) for r in roots if os.path.isfile(r)]
    paths += [os.path.join(d, n) for r in roots for d, _, names in os.walk(r) for n in names]
    hits, files = [], 0
    for path in paths:
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                blobs[path] = f.read()
            files += 1
    for where, blob in blobs.items():
        low = blob.lower()
        hits += [(where, n.decode()) for n in needles if n in low]
    return hits, files


def test_no_phi_in_records_training_outputs_or_logs(records_dir, tmp_path):
    """Default-suite variant: the fixture's converted cohort, then an 8-step run with evaluation; every
    byte of the records, checkpoints, metrics.jsonl, TensorBoard events and the run's stdout and stderr."""
    phi = read_phi(os.path.join(os.path.dirname(records_dir), "syn"))
    assert len(phi) > 50
    r = run_train(records_dir, tmp_path)
    hits, files = _phi_hits(phi, [records_dir, tmp_path], {"stdout": r.stdout, "stderr": r.stderr})
    assert files > 20 and any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert "val/recall_at_1" in read_metrics(tmp_path)[-1] and "step 8/8" in r.stderr  # the run and its log happened
    assert hits == []
    # the check can fail: a report carrying a PHI string would be found in the shards
    assert _phi_hits(phi[:1], [], {"planted": f"report ... {phi[0].upper()} ..."})[0]


@pytest.mark.slow
def test_no_phi_anywhere_from_dicom_to_saliency_maps(tmp_path):
    """synthetic cohort -> data_prep.convert -> train (2 steps) -> convert to safetensors -> evaluate ->
    interpret, each a CLI run whose stdout and stderr are kept; then every output byte is searched. Evaluated
    on the val split, which the run's own evaluation already needs: 6 patients leave a third split empty
    about one seed in six."""
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags(2)}
    logs = {}

    def run(name, *args):
        r = subprocess.run(
            [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
        logs[f"{name} stdout"], logs[f"{name} stderr"] = r.stdout, r.stderr
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"

    syn, rec, work, ckpt = tmp_path / "syn", tmp_path / "rec", tmp_path / "work", tmp_path / "model.safetensors"
    run("synthetic", "data_prep.synthetic", "--out", str(syn), "--patients", "6", "--seed", "3", "--small")
    run(
        "convert records",
        "data_prep.convert",
        "--dicom_dir",
        str(syn / "dicom"),
        "--reports",
        str(syn / "reports.csv"),
        "--out",
        str(rec),
        "--frames",
        "4",
        "--image_size",
        "32",
        "--shard_size",
        "8",
        "--salt",
        "privacy-salt",
        "--split_fractions",
        "0.5,0.5,0",
        "--workers",
        "2",
    )
    config = [f"--config.{k}={v}" for k, v in tiny_overrides(str(rec)).items()]
    config = ["--config", os.path.join(REPO, "configs", "tiny.py")] + config
    run(
        "train",
        "echoclip_jax.train",
        *config,
        "--workdir",
        str(work),
        "--config.total_steps=2",
        "--config.checkpoint_every_steps=1",
        "--config.log_every_steps=1",
        "--config.batch_size=8",
    )
    run("convert weights", "echoclip_jax.convert", *config, "--src", f"orbax:{work}", "--dst", f"safetensors:{ckpt}")
    run(
        "evaluate",
        "echoclip_jax.evaluate",
        *config,
        "--workdir",
        str(work),
        "--data_dir",
        str(rec),
        "--split",
        "val",
        "--out",
        str(tmp_path / "eval"),
        "--batch_size",
        "16",
    )
    run(
        "interpret",
        "echoclip_jax.interpret",
        *config,
        "--checkpoint",
        f"safetensors:{ckpt}",
        "--data_dir",
        str(rec),
        "--split",
        "val",
        "--limit",
        "2",
        "--frames",
        "2",
        "--out",
        str(tmp_path / "maps"),
        "--prompt",
        "pacemaker",
        "--batch_size",
        "8",
    )
    outputs = [rec, work, tmp_path / "model.json", ckpt, tmp_path / "eval", tmp_path / "maps"]
    assert all(os.path.exists(p) for p in outputs), [p for p in outputs if not os.path.exists(p)]
    for kind in (".png", ".npy", ".json"):
        assert any(n.endswith(kind) for _, _, ns in os.walk(tmp_path / "maps") for n in ns), kind
    assert any(n.endswith(".png") for _, _, ns in os.walk(tmp_path / "eval") for n in ns)
    hits, files = _phi_hits(read_phi(syn) + ["privacy-salt"], outputs, logs)  # everything but the input cohort
    assert files > 30 and hits == [], hits[:20]
