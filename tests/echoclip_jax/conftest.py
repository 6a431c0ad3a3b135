"""Session fixtures for the training tests: a tiny synthetic cohort converted to TFRecords once, a
tiny-config override that trains on it in seconds, and `run_train`, which trains in a fresh process."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest

from echoclip_jax.config import files
from echoclip_jax.runtime import storage
from echoclip_jax.training import checkpoint

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One XLA compilation cache per session, shared with the training subprocesses: the tiny train step
    is compiled once, not once per test."""

    path = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return path


@pytest.fixture(scope="session")
def records_dir(tmp_path_factory):
    """data_prep.synthetic (12 patients, small) -> data_prep.convert (4 frames of 32x32, 8 per shard)."""
    root = tmp_path_factory.mktemp("cohort")
    env = {**os.environ, "PYTHONPATH": REPO}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", *a], check=True, cwd=REPO, env=env, capture_output=True, text=True
    )
    run("data_prep.synthetic", "--out", str(root / "syn"), "--patients", "12", "--seed", "0", "--small")
    run(
        "data_prep.convert",
        "--dicom_dir",
        str(root / "syn" / "dicom"),
        "--reports",
        str(root / "syn" / "reports.csv"),
        "--out",
        str(root / "rec"),
        "--frames",
        "4",
        "--image_size",
        "32",
        "--shard_size",
        "8",
        "--salt",
        "test-salt",
        "--split_fractions",
        "0.7,0.3,0.0",
    )
    return str(root / "rec")


def tiny_overrides(records_dir: str) -> dict:
    """configs/tiny.py made smaller still: 32x32 images, batch 16, a 2-layer width-64 text tower."""
    return {
        "data_dir": records_dir,
        "batch_size": 16,
        "total_steps": 8,
        "checkpoint_every_steps": 4,
        "log_every_steps": 2,
        "eval_every_steps": 0,
        "eval_batches": 1,
        "model.embed_dim": 32,
        "model.vision.image_size": 32,
        "model.text.width": 64,
        "model.text.heads": 2,
        "model.text.layers": 2,
        "model.text.context_length": 32,
        "tokenizer.context_length": 32,
        "optim.warmup_steps": 2,
        "optim.lr": 2e-3,
        # lax.conv compiles ~3x faster on CPU than the models' default shifted-sum depthwise conv
        "model.vision.depthwise_impl": "lax",
    }


@pytest.fixture
def tiny_config(records_dir):
    c = files.load(CONFIGS / "tiny.py")
    for key, value in tiny_overrides(records_dir).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def xla_flags(devices: int) -> str:
    """tests/conftest.py's XLA flags (generous collective timeouts) with `devices` simulated CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


def train_command(records_dir, workdir, *extra: str, devices: int = 2, prelude: str = ""):
    """(argv, env) of `python -m echoclip_jax.train` on the tiny config, in a fresh process with `devices`
    CPU devices; with `prelude`, that Python code (e.g. a fault injection) runs first, then the same CLI.

    Whole runs go through a fresh process: a stuck run fails at run_train's timeout instead of hanging
    the suite, nothing left by earlier tests shares its XLA runtime, and few devices keep a 2-core CI quick."""
    cli = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(workdir)]
    cli += [f"--config.{k}={v}" for k, v in tiny_overrides(records_dir).items()] + list(extra)
    if prelude:
        run_cli = "\nimport runpy\nrunpy.run_module('echoclip_jax.train', run_name='__main__', alter_sys=True)\n"
        head = [sys.executable, "-c", prelude + run_cli]
    else:
        head = [sys.executable, "-m", "echoclip_jax.train"]
    return head + cli, {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags(devices)}


def run_train(
    records_dir, workdir, *extra: str, devices: int = 2, prelude: str = "", timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs train_command to the end (text stdout/stderr captured); with `check`, a non-zero exit fails
    the test with the run's stderr."""
    args, env = train_command(records_dir, workdir, *extra, devices=devices, prelude=prelude)
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"echoclip_jax.train exited with {r.returncode}:\n{r.stderr[-4000:]}")
    return r


def read_metrics(workdir) -> list[dict]:
    """The rows of a run's metrics.jsonl (a local or gs:// workdir)."""
    return storage.read_json_lines(storage.join(str(workdir), "metrics.jsonl"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The kill-and-resume runs (test_reliability, test_bucket_runs): the tiny config's 8 steps, a save every 2 (2,
# 4, 6, 8; 3 kept), a metrics row every step.
KILL_RUN = ("--config.checkpoint_every_steps=2", "--config.eval_batches=0", "--config.log_every_steps=1")


@pytest.fixture(scope="session")
def uninterrupted(records_dir, tmp_path_factory):
    """The run the kill tests' runs must end as (KILL_RUN, local workdir): its final parameters and its
    metrics rows."""
    wd = tmp_path_factory.mktemp("uninterrupted")
    run_train(records_dir, wd, *KILL_RUN)
    return checkpoint.restore_params(str(wd)), read_metrics(wd)
