"""Test configuration: 8 simulated CPU devices, so sharding is exercised for real.

The flag is set here, before JAX is imported anywhere, so no caller has to remember it.
"""

import logging
import os
import pathlib

# 8 simulated devices share 2 cores in CI: a collective can wait minutes for its peers under load, and
# XLA's CPU default aborts the whole process long before that.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=1200"
    " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
    " --xla_cpu_collective_timeout_seconds=1200"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tests.gcs_server import FakeGcs  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real EchoCLIP reference data lives beside the project (never copied into it).
REFERENCE_DIR = pathlib.Path(os.environ.get("ECHOCLIP_REFERENCE_DIR", REPO.parent / "shared" / "echoclip_reference"))


@pytest.fixture(scope="session")
def reference_dir():
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"EchoCLIP reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture
def project_logs():
    """The messages the project's loggers (`echoclip_jax.*`) emit during the test, at INFO and above,
    whatever an earlier command's `logs.setup` did to their propagation."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    own = logging.getLogger("echoclip_jax")
    handler, level = Collect(logging.INFO), own.level
    own.addHandler(handler)
    own.setLevel(logging.INFO)
    yield messages
    own.removeHandler(handler)
    own.setLevel(level)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real GCS server (fake-gcs-server) on 127.0.0.1 for this session, with the environment that points
    this process's clients and the subprocesses it starts at it (see tests/gcs_server.py)."""
    server = FakeGcs(tmp_path_factory.mktemp("gcs"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.start()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(gcs_server) -> str:
    """A new empty bucket on the session's GCS server: its gs:// URL."""
    return gcs_server.bucket()
