"""Which sharding layouts fit which TPU slices, and the predicted recipe time: `python -m echoclip_jax.aot`
over presets x topologies, each in its own process, compiled on this machine (libtpu compile-only).

    python bench/aot_sweep.py                                  # echoclip, global batch 1024
    python bench/aot_sweep.py --topologies v5e-16,v6e-16 --presets fsdp --timeout 1800

Each cell is one compile of the real train step (minutes for echoclip on 2 cores). The step time is the
aot command's: XLA's estimate where it gives one, else its roofline lower bound (no collectives), so MFU is
an upper bound. A compile that runs past --timeout is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/data_prep.py shadows data_prep

from bench import common  # noqa: E402

PRESETS = ("dp", "fsdp", "fsdp_tp")
TOPOLOGIES = ("v5e-16", "v5e-64", "v4-32", "v5p-32", "v6e-16")


def mesh_for(preset: str, tensor: int) -> dict:
    """config.mesh overrides: dp puts every device on data, fsdp on fsdp, fsdp_tp `tensor`-way on tensor."""
    if preset == "dp":
        return {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1}
    if preset == "fsdp":
        return {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
    if preset == "fsdp_tp":
        return {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": tensor}
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")


def run_one(config: str, topology: str, preset: str, batch: int, tensor: int, timeout: float) -> dict:
    overrides = {"batch_size": batch, "sharding_preset": preset, **mesh_for(preset, tensor)}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [
            sys.executable,
            "-m",
            "echoclip_jax.aot",
            "--config",
            os.path.join(REPO, "configs", f"{config}.py"),
            "--topology",
            topology,
            "--json",
            out,
        ] + [f"--config.{k}={v}" for k, v in overrides.items()]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(
                cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"topology": topology, "sharding_preset": preset, "not_run": f"compile past {timeout:.0f} s"}
        if r.returncode not in (0, 3) or not os.path.exists(out):
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            return {"topology": topology, "sharding_preset": preset, "not_run": f"exit {r.returncode}: {last[:200]}"}
        with open(out) as f:
            report = json.load(f)
        report["wall_s"] = time.perf_counter() - t0
        return report


def row(r: dict) -> list:
    head = [r["topology"], r["sharding_preset"]]
    if "not_run" in r:
        return head + ["-"] * 10 + [r["not_run"]]
    mesh = "x".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    gib = lambda b: f"{b / 2**30:.2f}"
    if "compiler_oom" in r:
        return head + [
            mesh,
            r["per_device_batch"],
            "-",
            "-",
            "-",
            f"> {gib(r['hbm_bytes'])}",
            "no (compiler OOM)",
            "-",
            "-",
            "-",
            f"{r['compile_s']:.0f} s",
        ]
    return head + [
        mesh,
        r["per_device_batch"],
        gib(r["arguments"]),
        gib(r["temporaries"]),
        gib(r["outputs"]),
        f"{gib(r['used'])} / {gib(r['hbm_bytes'])}",
        "yes" if r["fits"] else "no",
        f"{r['flops_per_step'] / 1e12:.1f}",
        f"{r['step_s'] * 1e3:.0f} ms ({r['step_time_source']}); {common.fmt_rate(r['samples_per_s'])}/s; "
        f"MFU {100 * r['mfu']:.0f}%",
        f"{r['recipe_hours']:.1f}",
        f"{r['compile_s']:.0f} s",
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="echoclip")
    ap.add_argument("--batch", type=int, default=1024, help="global batch (the paper's: 1024)")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--tensor", type=int, default=4, help="tensor-parallel ways for fsdp_tp")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
    ap.add_argument("--json", default="", help="also write the reports to this JSON file")
    ap.add_argument(
        "--reports",
        default="",
        help="comma-separated JSON files of earlier runs (--json): tabulate those instead of compiling",
    )
    ap.add_argument("--no_append", action="store_true")
    args = ap.parse_args(argv)

    reports = []
    if args.reports:
        for path in args.reports.split(","):
            with open(path) as f:
                reports += json.load(f)
    for topology in [] if args.reports else args.topologies.split(","):
        for preset in args.presets.split(","):
            print(f"[{topology} {preset}] ...", flush=True)
            reports.append(run_one(args.config, topology, preset, args.batch, args.tensor, args.timeout))
            print("  " + " | ".join(str(c) for c in row(reports[-1])), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(reports, f, indent=1)
    cells = ", ".join(f"{r['topology']} {r['sharding_preset']}" for r in reports)
    body = (
        f"Machine: {common.machine()} (compile only, libtpu; no TPU). Config {args.config}, global batch "
        f"{args.batch}; `python bench/aot_sweep.py --topologies T --presets P --tensor {args.tensor}` over "
        f"{cells}; fsdp_tp = {args.tensor}-way tensor parallel.\n\n"
    )
    body += common.table(
        [
            "topology",
            "preset",
            "mesh d x f x t",
            "batch per device",
            "arguments GiB",
            "temporaries GiB",
            "outputs GiB",
            "used / HBM GiB",
            "fits",
            "TFLOP per step",
            "predicted step",
            "50-epoch recipe h",
            "compile",
        ],
        [row(r) for r in reports],
    )
    body += (
        "\n\nPer device, from the compiled step's memory_analysis(): outputs are the donated state, "
        "written in place (used = arguments + outputs - donated + temporaries + code). TFLOP per step = "
        "cost_analysis() FLOPs x devices. Predicted step: XLA's estimate ('xla') where the executable gives "
        "one, else the roofline max(FLOPs / peak, bytes accessed / HBM bandwidth) per device ('roofline', "
        "collectives not counted: a lower bound, so MFU is an upper bound). Recipe: 50 epochs of 1,032,975 "
        "videos at this global batch."
    )
    print(body)
    if not args.no_append:
        common.append_section(f"aot: {args.config} compiled for TPU slices (presets x topologies)", body)
    return reports


if __name__ == "__main__":
    main()
