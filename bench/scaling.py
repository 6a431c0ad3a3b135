"""Step time and per-device memory on 1, 2, 4, 8 simulated CPU devices for each sharding preset.

    python bench/scaling.py                                   # tiny, global batch 32, dp / fsdp / fsdp_tp
    python bench/scaling.py --config echoclip --batch 8 --devices 1,8 --no_time   # memory only

Each device count runs in its own subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=N must be
set before JAX starts). Memory comes from the compiled step's memory_analysis() (per device: the SPMD
program of one device) and from the shardings of the train state (parameters + AdamW moments), checked
against total state / devices. The simulated devices share this machine's cores, so step time here shows
the partitioning overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/data_prep.py shadows data_prep

import jax
import numpy as np

from bench import common  # noqa: E402
from bench.train_step import load_config, synthetic_batch
from echoclip_jax.runtime import sharding
from echoclip_jax.training import step as step_lib

PRESETS = ("dp", "fsdp", "fsdp_tp")


def mesh_for(preset: str, n: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes: dp puts every device on data, fsdp on fsdp, fsdp_tp splits 2-way tensor."""
    if preset == "dp":
        return n, 1, 1
    if preset == "fsdp":
        return 1, n, 1
    if preset == "fsdp_tp":
        return (1, n // 2, 2) if n >= 2 else (1, 1, 1)
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")


def state_bytes(abs_state) -> tuple[int, int]:
    """(total bytes, bytes on device 0) of the train state, from its shapes and shardings."""

    total = per_dev = 0
    for leaf in jax.tree.leaves(abs_state):
        item = np.dtype(leaf.dtype).itemsize
        total += int(np.prod(leaf.shape)) * item
        per_dev += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * item
    return total, per_dev


def worker(args) -> None:
    """Runs in a subprocess with N devices: one JSON line per preset."""

    n = jax.device_count()
    presets = [p for p in args.presets.split(",") if n > 1 or p == "dp"]  # on 1 device all presets coincide
    steps = {}
    for preset in presets:
        c = load_config(args.config, args.batch, "float32", args.impl)
        c.sharding_preset = preset
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_for(preset, n)
        mesh = sharding.build_mesh(c.mesh)
        ts = step_lib.build_train_step(c, mesh, 1000)
        batch = jax.device_put(synthetic_batch(c), ts.batch_sh)
        compiled = ts.step.lower(ts.abs_state, batch).compile()
        mem = compiled.memory_analysis()
        total, per_dev = state_bytes(ts.abs_state)
        row = {
            "devices": n,
            "preset": preset,
            "mesh": mesh_for(preset, n),
            "state_total": total,
            "state_per_device": per_dev,
            "arguments": mem.argument_size_in_bytes,
            "temp": mem.temp_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "alias": mem.alias_size_in_bytes,
        }
        if not args.no_time:
            state = ts.init_state(step_lib.initial_params(c, ts.abs_params, ts.param_sh))
            steps[preset] = (compiled, state, batch)
        print("ROW " + json.dumps(row), flush=True)
    if steps:
        holder = {p: list(v) for p, v in steps.items()}

        def run(p):
            def f():
                compiled, state, batch = holder[p]
                state, m = compiled(state, batch)
                m["loss"].block_until_ready()
                holder[p][1] = state

            return f

        times = common.alternate({p: run(p) for p in steps}, rounds=args.rounds, warmup=1)
        for p, ts_ in times.items():
            print("TIME " + json.dumps({"devices": n, "preset": p, "times": ts_}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=32, help="global batch (divisible by every device count)")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--impl", default="lax", help="depthwise_impl (lax compiles fastest; memory is the point here)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no_time", action="store_true", help="memory only: compile, do not run")
    ap.add_argument("--no_append", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    rows, times = [], {}
    for n in [int(x) for x in args.devices.split(",")]:
        if args.batch % n:
            raise SystemExit(f"--batch {args.batch} is not divisible by {n} devices")
        env = dict(
            os.environ,
            XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip(),
        )
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--config",
            args.config,
            "--batch",
            str(args.batch),
            "--presets",
            args.presets,
            "--impl",
            args.impl,
            "--rounds",
            str(args.rounds),
        ]
        if args.no_time:
            cmd.append("--no_time")
        print(f"[{n} devices] ...", flush=True)
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"worker with {n} devices failed:\n{out.stderr[-4000:]}")
        for line in out.stdout.splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
            elif line.startswith("TIME "):
                t = json.loads(line[5:])
                times[(t["devices"], t["preset"])] = t["times"]

    base = times.get((1, "dp"))
    mib = lambda b: f"{b / 2**20:.1f}"
    table_rows, checks = [], []
    for r in rows:
        n, p = r["devices"], r["preset"]
        ideal = r["state_total"] / n
        ratio = r["state_per_device"] / ideal
        t = times.get((n, p))
        table_rows.append(
            [
                n,
                p,
                "x".join(map(str, r["mesh"])),
                mib(r["state_total"]),
                mib(r["state_per_device"]),
                f"{ratio:.2f}x",
                mib(r["arguments"]),
                mib(r["temp"]),
                common.spread(t) if t else "-",
                f"{common.median(t) / common.median(base):.2f}x" if t and base else "-",
            ]
        )
        if n == max(x["devices"] for x in rows) and p.startswith("fsdp"):
            checks.append((p, n, ratio))
    body = (
        f"Machine: {common.machine()}. Config {args.config}, global batch {args.batch}, fp32, "
        f"depthwise_impl {args.impl}; simulated CPU devices sharing the machine's cores.\n\n"
    )
    body += common.table(
        [
            "devices",
            "preset",
            "mesh d x f x t",
            "state total MiB",
            "state per device MiB",
            "per device / (total / devices)",
            "arguments MiB",
            "temp MiB",
            "step time",
            "vs 1 device",
        ],
        rows=table_rows,
    )
    body += (
        "\n\nState = parameters + AdamW moments (+ step, rng), per device from the shardings; "
        "'arguments' and 'temp' are the compiled step's memory_analysis() for one device (arguments "
        "include the batch shard). Target: FSDP state per device within 1.2x of total / devices on 8 "
        "devices: " + ", ".join(f"{p} on {n}: {r:.2f}x" for p, n, r in checks) + "."
    )
    print(body)
    if not args.no_append:
        common.append_section("scaling: simulated devices x sharding presets", body)
    return checks


if __name__ == "__main__":
    main()
