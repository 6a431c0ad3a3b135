"""The real train step compiled for a TPU pod slice on any machine, before renting the slice.

libtpu (the `tpu` extra: `pip install -e ".[tpu]"`) compiles for a TPU topology without a TPU
(`jax.experimental.topologies`). The step is `echoclip_jax.training.step.build_train_step`'s, over the
config's mesh and sharding preset laid on the topology's devices, lowered with abstract inputs: nothing is
allocated. The report holds per-device memory (arguments, temporaries, outputs) against the chip's HBM with
a verdict, FLOPs per step, a predicted step time and from it samples/s, MFU and the time of the paper's
recipe (50 epochs of 1,032,975 videos, one frame per video per epoch), and what the compiled step does that
it should not (host transfers, large replicated state, float32 matmuls when bfloat16 was asked).

The predicted step time is XLA's own estimate (`cost_analysis()["optimal_seconds"]`) when the executable
reports a positive one; otherwise (the usual case for this step) a roofline of ours: max(FLOPs / the
chip's peak, bytes accessed / its HBM bandwidth), per device. It leaves out collectives, so it is a lower
bound on the step time and the MFU derived from it an upper bound.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from echoclip_jax.config.validation import validate
from echoclip_jax.runtime import sharding, storage
from echoclip_jax.training import step as step_lib
from echoclip_jax.training.hlo import scan_hlo

RECIPE_VIDEOS = 1_032_975  # the paper's training videos; one random frame of each per epoch
RECIPE_EPOCHS = 50
# bf16 steps keep a few float32 products on purpose (the loss's logits, the embeddings' norms); more is a bug
F32_MATMUL_SHARE = 0.01
TPU_EXTRA = 'the `tpu` extra (pip install -e ".[tpu]", which pins libtpu)'


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # jax device_kind of the compile-only devices
    peak_flops: float  # dense bf16 FLOP/s per chip (one JAX device: v4/v5p megacore = both TensorCores)
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s


# Google Cloud TPU documentation, "System architecture" of each version (docs.cloud.google.com/tpu/docs/
# v4, v5e, v5p, v6e), per chip:
# | chip | bf16 peak   | HBM             | HBM bandwidth |
# | v4   | 275 TFLOP/s | 32 GiB (HBM2)   | 1200 GB/s     |
# | v5e  | 197 TFLOP/s | 16 GB (HBM2)    | 819 GB/s      |
# | v5p  | 459 TFLOP/s | 95 GB (HBM2e)   | 2765 GB/s     |
# | v6e  | 918 TFLOP/s | 32 GB           | 1640 GB/s     |
# The 16 GB and 32 GB chips are taken as GiB (what the TPU compiler's own out-of-memory report counts).
GIB = 1 << 30
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB, 1200e9),
    "v5e": Chip("TPU v5 lite", 197e12, 16 * GIB, 819e9),
    "v5p": Chip("TPU v5", 459e12, 95 * 10**9, 2765e9),
    "v6e": Chip("TPU v6 lite", 918e12, 32 * GIB, 1640e9),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # what users rent, as MaxText names it: v5e-16 = 16 chips; v4-32 / v5p-32 = 32 TensorCores
    chip: str
    topology_name: str  # libtpu's: "v5e:4x4", "v4:2x2x4"
    chips: int

    @property
    def chip_config(self) -> str:
        return "megacore" if self.chip in ("v4", "v5p") else "default"

    @property
    def accelerator_type(self) -> str:  # as gcloud names it
        return f"v5litepod-{self.chips}" if self.chip == "v5e" else self.name


def _topologies() -> dict:
    out = {}
    grids_2d = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    for chip, lib in (("v5e", "v5e"), ("v6e", "v6e")):
        for n, grid in grids_2d.items():
            out[f"{chip}-{n}"] = Topology(f"{chip}-{n}", chip, f"{lib}:{grid}", n)
    grids_3d = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
    for chip, lib in (("v4", "v4"), ("v5p", "v5")):
        for n, grid in grids_3d.items():
            out[f"{chip}-{2 * n}"] = Topology(f"{chip}-{2 * n}", chip, f"{lib}:{grid}", n)
    return out


TOPOLOGIES = _topologies()


def get_topology(name: str) -> Topology:
    """A name from TOPOLOGIES, or gcloud's accelerator type (v5litepod-16 = v5e-16)."""
    key = name.strip().lower().replace("v5litepod-", "v5e-")
    if key not in TOPOLOGIES:
        raise ValueError(f"--topology {name!r}: unknown; use one of {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[key]


def topology_devices(topo: Topology) -> list:
    """Compile-only devices of `topo` (no TPU needed; libtpu required)."""
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"compiling for {topo.name} needs libtpu, which is not installed: install {TPU_EXTRA}")
    # libtpu looks for a Cloud TPU VM's metadata when it starts; say there is none (first call only)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # compile-only use needs no exclusive hold on a chip: other JAX processes on this host may hold the lock
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)

    bounds = (1, 1, 1) if topo.chips == 1 else (2, 2, 1)
    devices = list(
        topologies.get_topology_desc(
            platform="tpu",
            topology_name=topo.topology_name,
            chip_config_name=topo.chip_config,
            chips_per_host_bounds=bounds,
        ).devices
    )
    kind = CHIPS[topo.chip].kind
    if len(devices) != topo.chips or devices[0].device_kind != kind:
        raise RuntimeError(
            f"libtpu gave {len(devices)} x {devices[0].device_kind!r} for {topo.name}, expected "
            f"{topo.chips} x {kind!r}: reinstall {TPU_EXTRA}"
        )
    return devices


def abstract_batch(config, batch_sh) -> dict:
    """The train step's batch as sharded ShapeDtypeStructs: uint8 frames and int32 tokens."""

    b, s, k = int(config.batch_size), int(config.model.vision.image_size), int(config.data.frames_per_sample)
    shape = (b, s, s, 3) if k == 1 else (b, k, s, s, 3)
    return {
        "images": jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=batch_sh["images"]),
        "tokens": jax.ShapeDtypeStruct(
            (b, int(config.model.text.context_length)), jnp.int32, sharding=batch_sh["tokens"]
        ),
    }


def state_bytes(abs_state) -> tuple[int, int]:
    """(total bytes, bytes on one device) of the train state, from its shapes and shardings."""

    total = per_device = 0
    for leaf in jax.tree.leaves(abs_state):
        item = np.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.shape) * item
        per_device += math.prod(leaf.sharding.shard_shape(leaf.shape)) * item
    return total, per_device


def replicated_state(abs_state, min_bytes: int = 1 << 20) -> list[tuple[str, int]]:
    """State leaves of at least `min_bytes` held whole on every device of a multi-device mesh, largest first."""

    out = []
    for path, leaf in jax.tree.leaves_with_path(abs_state):
        size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if size >= min_bytes and leaf.sharding.num_devices > 1 and leaf.sharding.is_fully_replicated:
            out.append((jax.tree_util.keystr(path), size))
    return sorted(out, key=lambda x: -x[1])


def _oom_message(err: Exception) -> str | None:
    msg = str(err)
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg or "exceeds the memory" in msg.lower():
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        return " ".join(lines[:3])[:600]
    return None


def compile_for_topology(config, topology: str, hlo_path: str = "") -> dict:
    """Compiles `config`'s train step for `topology`; returns the report (see module docstring). With
    `hlo_path`, the optimized HLO of the compiled step is written there."""

    topo = get_topology(topology)
    chip = CHIPS[topo.chip]
    devices = topology_devices(topo)
    validate(config, num_devices=len(devices), num_processes=1, compile_only=True)
    mesh = sharding.build_mesh(config.mesh, devices)
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    recipe_steps = math.ceil(RECIPE_EPOCHS * RECIPE_VIDEOS / int(config.batch_size))
    ts = step_lib.build_train_step(config, mesh, int(config.total_steps))
    batch = abstract_batch(config, ts.batch_sh)
    total_state, state_per_device = state_bytes(ts.abs_state)
    report = {
        "topology": topo.name,
        "topology_name": topo.topology_name,
        "chip": topo.chip,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "sharding_preset": config.sharding_preset,
        "batch_size": int(config.batch_size),
        "per_device_batch": int(config.batch_size) // data_shards,
        "dtype": config.model.dtype,
        "image_size": int(config.model.vision.image_size),
        "context_length": int(config.model.text.context_length),
        "hbm_bytes": chip.hbm_bytes,
        "state_bytes": total_state,
        "state_bytes_per_device": state_per_device,
        "replicated_state": replicated_state(ts.abs_state) if config.sharding_preset != "dp" else [],
    }
    t0 = time.perf_counter()
    lowered = ts.step.lower(ts.abs_state, batch)
    report["lower_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program that does not fit HBM
        oom = _oom_message(e)
        if oom is None:
            raise
        report.update(compile_s=time.perf_counter() - t1, fits=False, compiler_oom=oom)
        return report
    report["compile_s"] = time.perf_counter() - t1
    mem = compiled.memory_analysis()
    used = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    report.update(
        arguments=mem.argument_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        outputs=mem.output_size_in_bytes,
        aliased=mem.alias_size_in_bytes,
        code=mem.generated_code_size_in_bytes,
        used=used,
        fits=used <= chip.hbm_bytes,
        host_bytes=mem.host_argument_size_in_bytes + mem.host_temp_size_in_bytes + mem.host_output_size_in_bytes,
    )
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    text = compiled.as_text()
    report.update(scan_hlo(text))
    # cost_analysis() counts a loop body once: add the matmuls of the repeated runs (bytes are not corrected)
    flops = float(cost.get("flops", 0.0)) + report["loop_matmul_flops"]
    accessed = float(cost.get("bytes accessed", 0.0))
    xla_s = float(cost.get("optimal_seconds", -1.0))
    compute_s, memory_s = flops / chip.peak_flops, accessed / chip.hbm_bandwidth
    step_s = xla_s if xla_s > 0 else max(compute_s, memory_s)
    report.update(
        flops_per_device=flops,
        flops_per_step=flops * len(devices),
        bytes_accessed_per_device=accessed,
        xla_optimal_seconds=xla_s,
        roofline_compute_s=compute_s,
        roofline_memory_s=memory_s,
        step_s=step_s,
        step_time_source="xla" if xla_s > 0 else "roofline",
        samples_per_s=int(config.batch_size) / step_s if step_s > 0 else None,
        mfu=flops / step_s / chip.peak_flops if step_s > 0 else None,
        recipe_steps=recipe_steps,
        recipe_hours=recipe_steps * step_s / 3600,
    )
    if hlo_path:
        storage.write_text(hlo_path, text)  # a local path or a gs:// URL
    return report


def _mib(x) -> str:
    return f"{x / 2**20:,.0f} MiB"


def format_report(r: dict) -> list[str]:
    """The report as the lines the command prints."""
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    out = [
        f"{r['topology']} ({r['topology_name']}, {r['devices']} devices), mesh {mesh}, preset "
        f"{r['sharding_preset']}, global batch {r['batch_size']} ({r['per_device_batch']} per device), {r['dtype']}",
        f"compiled in {r['compile_s']:.0f} s (lowered in {r['lower_s']:.0f} s)",
        f"train state: {_mib(r['state_bytes'])} in all, {_mib(r['state_bytes_per_device'])} per device",
    ]
    if "compiler_oom" in r:
        return out + [
            f"DOES NOT FIT: the TPU compiler ran out of HBM ({_mib(r['hbm_bytes'])} per chip): {r['compiler_oom']}"
        ]
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    out += [
        f"per device: arguments {_mib(r['arguments'])}, temporaries {_mib(r['temporaries'])}, outputs "
        f"{_mib(r['outputs'])} ({_mib(r['aliased'])} of them donated in place), code {_mib(r['code'])}",
        f"memory: {_mib(r['used'])} of {_mib(r['hbm_bytes'])} HBM per chip ({100 * r['used'] / r['hbm_bytes']:.0f}%): "
        f"{verdict}",
        f"FLOPs per step: {r['flops_per_step']:.3e} ({r['flops_per_device']:.3e} per device); bytes accessed per "
        f"device {r['bytes_accessed_per_device']:.3e}",
    ]
    if r["step_time_source"] == "xla":
        out.append(f"step time: {1e3 * r['step_s']:.1f} ms (XLA's estimate)")
    else:
        out.append(
            f"step time: {1e3 * r['step_s']:.1f} ms, a roofline lower bound (XLA gave no estimate: "
            f"optimal_seconds={r['xla_optimal_seconds']:g}): compute {1e3 * r['roofline_compute_s']:.1f} ms, "
            f"HBM traffic {1e3 * r['roofline_memory_s']:.1f} ms, collectives not counted"
        )
    out.append(
        f"=> {r['samples_per_s']:,.0f} samples/s, MFU {100 * r['mfu']:.0f}%, paper's recipe ({RECIPE_EPOCHS} epochs "
        f"of {RECIPE_VIDEOS:,} videos = {r['recipe_steps']:,} steps) {r['recipe_hours']:.1f} h"
    )
    issues = []
    if r["host_transfers"] or r["host_bytes"]:
        issues.append(f"{r['host_transfers']} host transfers in the step ({_mib(r['host_bytes'])} in host memory)")
    if r["loops"]:
        issues.append(
            f"{r['loops']} loops in the step: their matmuls are counted for every trip "
            f"(+{r['loop_matmul_flops']:.3e} FLOPs per device), their HBM traffic once (XLA's count)"
        )
    if r["replicated_state"]:
        big = ", ".join(f"{p} {_mib(b)}" for p, b in r["replicated_state"][:3])
        issues.append(f"{len(r['replicated_state'])} state arrays of >= 1 MiB replicated on every device: {big}")
    f32 = r["matmul_flops_by_dtype"].get("f32", 0)
    share = f32 / max(sum(r["matmul_flops_by_dtype"].values()), 1)
    if r["dtype"] == "bfloat16" and share > F32_MATMUL_SHARE:
        issues.append(f"{100 * share:.2f}% of matmul FLOPs in float32 (largest: {'; '.join(r['largest_f32_matmuls'])})")
    return (
        out
        + [f"check: {s}" for s in issues]
        + (
            []
            if issues
            else [
                f"check: no host transfers, no replicated state of >= 1 MiB, {100 * share:.2f}% of matmul FLOPs in "
                "float32"
            ]
        )
    )
