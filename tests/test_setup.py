"""Setting up for the machine (the Makefile and setup.py's extras) and commands that run without libtpu's
noise where there is no TPU.

`make accel` is `make setup`'s detection (pointed here at fake devices, a fake nvidia-smi and a fake GCE
metadata server); `make setup` refuses an unsupported Python before it makes a venv, and sets up again when
ACCEL names another accelerator. With libtpu installed on a machine without TPU chips (this test
environment), a command must not start JAX's TPU backend, whose libtpu prints errors. The slow tests ask
PyPI (pip's resolver, nothing installed) that the gpu and tpu extras resolve to their pins beside everything
`make setup` installs, and compile for a TPU topology through the command line without JAX_PLATFORMS.
"""

import http.server
import importlib.util
import json
import os
import pathlib
import runpy
import subprocess
import sys
import threading
import types

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from echoclip_jax.runtime import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
# what libtpu and JAX print when JAX starts the TPU backend on a machine without a TPU
TPU_NOISE = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "Unable to initialize backend 'tpu'", "InitGoogle")
needs_libtpu_without_tpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or cli.tpu_chips_here(),
    reason="needs libtpu installed (make setup-aot) on a machine without TPU chips",
)


def _make(*args, check=True):
    r = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120
    )
    assert not check or r.returncode == 0, r.stderr
    return r


def _accel(tmp_path, **where) -> str:
    """`make accel` looking at tmp_path's fake /sys/bus/pci/devices and /dev, no nvidia-smi and no metadata."""
    (tmp_path / "pci").mkdir(exist_ok=True)
    (tmp_path / "dev").mkdir(exist_ok=True)
    places = {
        "PCI_DEVICES": tmp_path / "pci",
        "DEV": tmp_path / "dev",
        "NVIDIA_SMI": "no-such-nvidia-smi",
        "TPU_METADATA": "http://127.0.0.1:9/accelerator-type",
        **where,
    }
    return _make("accel", *(f"{k}={v}" for k, v in places.items())).stdout


def _pci_device(tmp_path, slot, vendor, device):
    d = tmp_path / "pci" / slot
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def test_accel_detects_a_tpu_by_its_pci_id_not_any_google_device(tmp_path):
    assert _accel(tmp_path).startswith("cpu ")
    _pci_device(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # Google's gVNIC network card: not a TPU
    _pci_device(tmp_path, "0000:00:05.0", "0x10de", "0x2330")  # an NVIDIA H100 without its driver
    assert _accel(tmp_path).startswith("cpu ")
    _pci_device(tmp_path, "0000:00:06.0", "0x1ae0", "0x0063")  # TPU v5e
    assert _accel(tmp_path).startswith("tpu (a TPU chip on the PCI bus")


def test_accel_detects_a_tpu_device_node_and_nvidia_gpus(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "accel0").touch()  # TPU v2-v4
    assert _accel(tmp_path).startswith("tpu (a TPU device")
    (tmp_path / "dev" / "accel0").unlink()
    (tmp_path / "dev" / "nvidia0").touch()
    assert _accel(tmp_path).startswith("gpu (")
    (tmp_path / "dev" / "nvidia0").unlink()
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(0o755)
    assert _accel(tmp_path, NVIDIA_SMI=smi).startswith("gpu (nvidia-smi")


def test_accel_asks_gce_metadata_for_a_tpu_vm(tmp_path):
    answers = {"/tpu-vm": (200, b"v5litepod-8"), "/cpu-vm": (404, b"not found")}

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, body = answers[self.path] if self.headers["Metadata-Flavor"] == "Google" else (403, b"")
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert _accel(tmp_path, TPU_METADATA=f"{url}/tpu-vm").startswith("tpu (GCE metadata: accelerator-type v5lite")
        assert _accel(tmp_path, TPU_METADATA=f"{url}/cpu-vm").startswith("cpu ")
    finally:
        server.shutdown()


def test_accel_given_wins_and_a_wrong_one_is_refused():
    assert _make("accel", "ACCEL=gpu").stdout.startswith("gpu (ACCEL given)")
    r = _make("accel", "ACCEL=cuda", check=False)
    assert r.returncode != 0 and "ACCEL=cuda: use cpu, gpu or tpu" in r.stderr


@pytest.mark.parametrize("version", ["3.10", "3.14", None])
def test_setup_refuses_an_unsupported_python_before_making_a_venv(tmp_path, version):
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\necho {version}\n" if version else "#!/bin/sh\nexit 127\n")
    python.chmod(0o755)
    venv = tmp_path / "venv"
    r = _make("setup", f"PYTHON={python}", f"VENV={venv}", "ACCEL=cpu", check=False)
    assert r.returncode != 0
    said = f"is Python {version};" if version else "is not found;"
    assert f"make setup: {python} {said} echoclip-jax needs Python 3.11, 3.12 or 3.13" in r.stderr
    assert "uv python install 3.12" in r.stderr and "make setup PYTHON=python3.12" in r.stderr
    assert not venv.exists()


def test_setup_takes_a_supported_python_to_make_the_venv(tmp_path):
    python = tmp_path / "python3"  # says 3.12, then stands in for `python -m venv` and stops there
    python.write_text('#!/bin/sh\nif [ "$1" = -c ]; then echo 3.12; else echo "venv: $*"; exit 7; fi\n')
    python.chmod(0o755)
    venv = tmp_path / "venv"
    r = _make("setup", f"PYTHON={python}", f"VENV={venv}", "ACCEL=gpu", check=False)
    assert r.returncode != 0 and "needs Python" not in r.stderr
    assert f"venv: -m venv {venv}" in r.stdout


def test_setup_is_done_again_for_another_accelerator(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed"
    stamp.write_text("cpu\n")
    os.utime(stamp, (REPO.joinpath("setup.py").stat().st_mtime + 60,) * 2)
    up_to_date = lambda *a: _make("-q", "setup", f"VENV={venv}", *a, check=False).returncode == 0
    assert up_to_date() and up_to_date("ACCEL=cpu")
    assert not up_to_date("ACCEL=gpu") and not up_to_date("ACCEL=tpu")
    os.utime(stamp, (REPO.joinpath("setup.py").stat().st_mtime - 60,) * 2)
    assert not up_to_date()


def _without_jax_platforms(**extra):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


PROBE = (
    "import sys, jax\n"
    "from echoclip_jax.runtime import cli\n"
    "body = lambda f: print('backend', jax.default_backend(), len(jax.devices()))\n"
    "sys.exit(cli.run(body, cli.flag_values(), ['probe', '--verbosity', '0'], name='probe', doc='probe'))\n"
)


@needs_libtpu_without_tpu
def test_commands_leave_out_the_absent_tpu_quietly():
    r = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=_without_jax_platforms(), capture_output=True, text=True
    )
    assert r.returncode == 0 and "backend cpu 8" in r.stdout, r.stderr  # conftest's 8 CPU devices
    assert not [n for n in TPU_NOISE if n in r.stderr], r.stderr
    # the same without the command convention's choice: JAX starts libtpu, which says what the noise is
    r = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=_without_jax_platforms(JAX_PLATFORMS=""),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and [n for n in TPU_NOISE if n in r.stderr], r.stderr


@needs_libtpu_without_tpu
def test_a_failing_train_run_says_only_its_error(tmp_path):
    cmd = [sys.executable, "-m", "echoclip_jax.train", "--config", str(REPO / "configs" / "tiny.py")]
    cmd += ["--workdir", str(tmp_path / "run"), f"--config.data_dir={tmp_path / 'none'}", "--verbosity", "0"]
    r = subprocess.run(cmd, cwd=REPO, env=_without_jax_platforms(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "echoclip_jax.train: error:" in r.stderr, r.stderr
    assert not [n for n in TPU_NOISE if n in r.stderr], r.stderr


@pytest.mark.slow
@needs_libtpu_without_tpu
def test_aot_still_compiles_for_a_tpu_topology_without_jax_platforms(tmp_path):
    small = {"batch_size": 8, "model.embed_dim": 32, "model.vision.image_size": 32, "model.text.width": 64}
    small |= {"model.text.heads": 2, "model.text.layers": 2, "model.text.context_length": 32}
    small |= {"tokenizer.context_length": 32, "model.text.vocab_size": 1024, "model.text.eos_id": 1023}
    cmd = [sys.executable, "-m", "echoclip_jax.aot", "--config", str(REPO / "configs" / "tiny.py")]
    cmd += ["--topology", "v5e-1", "--json", str(tmp_path / "r.json"), "--verbosity", "0"]
    cmd += [f"--config.{k}={v}" for k, v in small.items()]
    r = subprocess.run(cmd, cwd=REPO, env=_without_jax_platforms(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["devices"] == 1 and report["fits"]
    assert not [n for n in TPU_NOISE if n in r.stderr], r.stderr[-4000:]


def _setup_kwargs() -> dict:
    """setup.py's arguments, read by running it with a stand-in for setuptools (which a venv of Python 3.12 or
    newer does not have)."""
    seen = {}
    stand_in = types.ModuleType("setuptools")
    stand_in.setup, stand_in.find_packages = (lambda **kw: seen.update(kw)), (lambda **kw: [])
    real = sys.modules.get("setuptools")
    sys.modules["setuptools"] = stand_in
    try:
        runpy.run_path(str(REPO / "setup.py"))
    finally:
        if real is None:
            del sys.modules["setuptools"]
        else:
            sys.modules["setuptools"] = real
    return seen


def test_every_requirement_is_pinned_and_the_accelerators_are_extras():
    kw = _setup_kwargs()
    extras = kw["extras_require"]
    for req in [*kw["install_requires"], *(r for reqs in extras.values() for r in reqs)]:
        spec = list(Requirement(req).specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{req}: pin it exactly"
    assert {"gpu", "tpu"} <= set(extras)
    assert any(r.startswith("jax-cuda12-plugin[with-cuda]==0.10.2") for r in extras["gpu"])
    assert any(r.startswith("libtpu==") for r in extras["tpu"])
    assert not any(r.startswith("libtpu") for r in kw["install_requires"])
    assert kw["python_requires"] == ">=3.11,<3.14"
    assert "Programming Language :: Python :: 3.13" in kw["classifiers"]


@pytest.mark.slow
@pytest.mark.parametrize("accel", ["gpu", "tpu"])
def test_accelerator_extras_resolve_to_their_pins_from_pypi(tmp_path, accel):
    """pip's resolver against PyPI, for this platform and Python, on what `make setup ACCEL=<accel>` installs:
    every pin there is what gets installed (jax, jaxlib, the CUDA plugin and its CUDA libraries, libtpu)."""
    report = tmp_path / "report.json"
    extras = f"test,interop,beam,{accel}"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    cmd += ["--report", str(report), f"{REPO}[{extras}]"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    resolved = {
        canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    kw = _setup_kwargs()
    pins = {}
    for req in [*kw["install_requires"], *(r for x in extras.split(",") for r in kw["extras_require"][x])]:
        req = Requirement(req)
        if req.marker is None or req.marker.evaluate():
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    wrong = {name: (pin, resolved.get(name)) for name, pin in pins.items() if resolved.get(name) != pin}
    assert not wrong, f"pinned vs resolved: {wrong}"
    assert resolved["jax"] == resolved["jaxlib"] == "0.10.2"
    if accel == "gpu":
        assert resolved["jax-cuda12-plugin"] == resolved["jax-cuda12-pjrt"] == "0.10.2"
        assert "libtpu" not in resolved
    else:
        assert resolved["libtpu"] == pins["libtpu"] and not any(n.startswith("jax-cuda") for n in resolved)
