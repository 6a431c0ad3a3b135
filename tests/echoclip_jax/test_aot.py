"""echoclip_jax.aot: the train step compiled for TPU topologies on this CPU machine (libtpu compile-only),
and the backend choice that must follow the mesh the program is compiled for, not the host's backend."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from echoclip_jax.models import backend
from echoclip_jax.training import pod_compile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason=f"libtpu is not installed: install {pod_compile.TPU_EXTRA}"
)

# configs/tiny.py made smaller still, so that the TPU compile takes well under a minute on 2 cores
SMALL = {
    "batch_size": 32,
    "model.dtype": "bfloat16",
    "sharding_preset": "fsdp",
    "mesh.data": 1,
    "mesh.fsdp": -1,
    "model.embed_dim": 32,
    "model.vision.image_size": 32,
    "model.text.width": 64,
    "model.text.heads": 2,
    "model.text.layers": 2,
    "model.text.context_length": 32,
    "tokenizer.context_length": 32,
    "model.text.vocab_size": 1024,
    "model.text.eos_id": 1023,
}


def run_aot(tmp_path, config: str, topology: str, overrides: dict, timeout: float):
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "echoclip_jax.aot",
        "--config",
        os.path.join(REPO, "configs", config),
        "--topology",
        topology,
        "--json",
        str(out),
    ] + [f"--config.{k}={v}" for k, v in overrides.items()]
    r = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode in (0, 3), r.stderr[-4000:]
    return json.loads(out.read_text()), r


@needs_libtpu
def test_backend_choice_follows_the_mesh_not_the_host():
    devices = pod_compile.topology_devices(pod_compile.get_topology("v5e-4"))
    mesh = jax.make_mesh((1, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3, devices=devices)
    assert jax.default_backend() == "cpu" and backend.platform() == "cpu"
    assert backend.depthwise_impl("auto", 56 * 56) == "shifted" and backend.mean_as_product()
    with backend.target(mesh):
        assert backend.platform() == "tpu"
        assert backend.depthwise_impl("auto", 56 * 56) == "lax" and backend.depthwise_impl("auto", 49) == "lax"
        assert not backend.mean_as_product()
        assert backend.depthwise_impl("shifted", 49) == "shifted"  # an explicit choice is kept
    seen = []
    backend.for_mesh(mesh, lambda: seen.append(backend.platform()))()
    assert seen == ["tpu"] and backend.platform() == "cpu"


def test_constrain_batch_keeps_the_batch_split_against_an_fsdp_table():
    """The text tower's failure: a token table split over "fsdp" on its width made GSPMD run every device
    on the whole batch; the constraint keeps rows split."""
    mesh = jax.make_mesh(
        (1, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:4]
    )
    table = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    tokens = jax.ShapeDtypeStruct((8, 5), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    def embed(t, ids):
        return backend.constrain_batch(jnp.take(t, ids, axis=0) * 2.0)

    plain = jax.jit(embed).lower(table, tokens).compile().output_shardings
    constrained = jax.jit(backend.for_mesh(mesh, embed)).lower(table, tokens).compile().output_shardings
    assert plain.shard_shape((8, 5, 16)) != (2, 5, 16)  # what the towers got before
    assert constrained.shard_shape((8, 5, 16)) == (2, 5, 16)


def test_topology_names_and_usage_errors(monkeypatch):
    assert pod_compile.get_topology("v5litepod-16") is pod_compile.TOPOLOGIES["v5e-16"]
    assert pod_compile.TOPOLOGIES["v4-32"].chips == 16 and pod_compile.TOPOLOGIES["v4-32"].topology_name == "v4:2x2x4"
    assert (
        pod_compile.TOPOLOGIES["v5p-8"].topology_name == "v5:2x2x1" and pod_compile.TOPOLOGIES["v6e-256"].chips == 256
    )
    with pytest.raises(ValueError, match="--topology 'v9-8'.*v5e-16"):
        pod_compile.get_topology("v9-8")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"needs libtpu.*`tpu` extra"):
        pod_compile.topology_devices(pod_compile.get_topology("v5e-4"))


@needs_libtpu
def test_scan_hlo_counts_matmul_flops_by_dtype():
    """On the TPU program (XLA:CPU would compute the bf16 product in float32)."""

    def f(a, b, c, d):
        return a @ b, (c @ d).astype(jnp.float32)

    one = NamedSharding(
        jax.make_mesh(
            (1,),
            ("x",),
            axis_types=(AxisType.Auto,),
            devices=pod_compile.topology_devices(pod_compile.get_topology("v5e-1")),
        ),
        P(),
    )
    shapes = (((8, 16), jnp.float32), ((16, 4), jnp.float32), ((32, 8), jnp.bfloat16), ((8, 2), jnp.bfloat16))
    args = [jax.ShapeDtypeStruct(s, t, sharding=one) for s, t in shapes]
    scan = pod_compile.scan_hlo(jax.jit(f).lower(*args).compile().as_text())
    assert scan["matmul_flops_by_dtype"] == {"f32": 2 * 8 * 4 * 16, "bf16": 2 * 32 * 2 * 8}
    # the TPU compiler writes these products as convolutions
    assert scan["host_transfers"] == 0 and scan["largest_f32_matmuls"] == ["convolution f32[8,16] x f32[16,4]"]

    def loop(x, w):  # a loop body's matmul counts once per trip (cost_analysis() counts it once)
        return jax.lax.fori_loop(0, 6, lambda i, h: jnp.tanh(h @ w), x)

    square = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=one)
    scan = pod_compile.scan_hlo(jax.jit(loop).lower(square, square).compile().as_text())
    assert scan["matmul_flops_by_dtype"] == {"bf16": 6 * 2 * 256**3}
    assert scan["loops"] == 1 and scan["loop_matmul_flops"] == 5 * 2 * 256**3


def check_memory_against_state(r: dict, shards: int, padding: float):
    """Per-device arguments = the train state / shards + this device's batch, plus at most `padding` of it
    (the TPU lays arrays out in (8, 128) tiles: a 1-D [C / shards] norm scale or a [7, 7, C / shards] kernel
    is padded to whole tiles); the donated state comes back in place; the FLOPs add up over the devices."""
    batch = r["per_device_batch"] * (3 * r["image_size"] ** 2 + 4 * r["context_length"])
    expected = r["state_bytes"] / shards + batch
    assert expected <= r["arguments"] <= (1 + padding) * expected, (r["arguments"], expected)
    assert r["arguments"] >= r["state_bytes_per_device"]
    assert r["aliased"] >= 0.95 * r["arguments"]  # everything but the batch is donated and written in place
    assert r["used"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"] + r["code"]
    assert math.isclose(r["flops_per_step"], r["flops_per_device"] * r["devices"])
    assert r["host_transfers"] == 0 and r["host_bytes"] == 0


@needs_libtpu
def test_small_step_compiles_for_v5e_4(tmp_path):
    r, proc = run_aot(tmp_path, "tiny.py", "v5e-4", SMALL, timeout=600)
    assert proc.returncode == 0 and r["fits"] and r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    check_memory_against_state(r, shards=4, padding=0.25)  # widths of 10 to 320: much of it padding
    assert r["per_device_batch"] == 8 and 0 < r["used"] < r["hbm_bytes"] / 100
    # bf16 compute: float32 matmuls only in the loss's [32, 32] logits and the embedding norms
    f32 = r["matmul_flops_by_dtype"].get("f32", 0)
    assert f32 <= 0.01 * sum(r["matmul_flops_by_dtype"].values())
    assert r["step_s"] > 0 and r["samples_per_s"] == pytest.approx(32 / r["step_s"])
    assert r["recipe_steps"] == math.ceil(50 * 1_032_975 / 32)
    assert "fits" in proc.stderr and "MFU" in proc.stderr


@pytest.mark.slow
@needs_libtpu
def test_echoclip_compiles_for_v5e_and_fits(tmp_path):
    r, proc = run_aot(tmp_path, "echoclip.py", "v5e-4", {"batch_size": 64}, timeout=1800)
    assert proc.returncode == 0 and r["fits"] and r["mesh"]["fsdp"] == 4
    # ~151.5M parameters, f32 master weights + two AdamW moments
    assert 140e6 * 12 < r["state_bytes"] < 160e6 * 12
    check_memory_against_state(r, shards=4, padding=0.02)
    assert r["matmul_flops_by_dtype"].get("f32", 0) <= 0.01 * sum(r["matmul_flops_by_dtype"].values())


def test_tpu_pod_preflight_compiles_before_the_pod_job():
    script = os.path.join(REPO, "launch", "tpu_pod.sh")
    args = ["tpu1", "us-central2-b", "configs/echoclip.py", "gs://b/r", "--config.batch_size=512"]
    lines = subprocess.run(
        ["bash", script, "--dry_run", "--preflight=v5e-16", *args], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert "-m echoclip_jax.aot --config configs/echoclip.py --topology v5e-16 --config.batch_size=512" in lines[0]
    assert lines[1].startswith("gcloud compute tpus tpu-vm ssh tpu1") and "echoclip_jax.train" in lines[1]
    described = subprocess.run(
        ["bash", script, "--preflight", "--dry_run", *args], check=True, capture_output=True, text=True
    ).stdout.splitlines()[0]
    assert '--topology "$(gcloud compute tpus tpu-vm describe tpu1 --zone us-central2-b' in described
