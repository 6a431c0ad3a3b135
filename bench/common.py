"""Shared helpers for bench/*.py: A/B timing, the machine's description, its measured matmul peak, and
the BENCHMARKS.md appender.

The machines are shared and noisy, so every comparison is timed in one process, alternating A/B/A/B
after a warm-up, and reported as a ratio of medians; lone absolute times are context only.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")


def alternate(
    fns: dict[str, Callable[[], object]], *, rounds: int = 5, warmup: int = 1, pause: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of each fn, called in turn (A, B, C, A, B, C, ...) after `warmup` calls each.

    Each fn must block until its work is done (e.g. `jax.block_until_ready`), or the time is a lie.
    `pause` seconds of sleep before each timed call let the previous call's after-effects settle
    (PyTorch's spinning OpenMP threads and freed memory slowed the next call by up to 10%).
    """
    if rounds < 1 or warmup < 0 or pause < 0:
        raise ValueError(f"rounds must be >= 1 and warmup, pause >= 0, got {rounds}, {warmup}, {pause}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """Median with the min-max range, for a table cell: '12.3 ms (11.9-14.0)'."""
    return f"{median(xs) * 1e3:.1f} ms ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def machine() -> str:
    """One line: CPU model, cores, memory, load average now (the noise the other users add)."""
    mem = memory_gib()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB" if mem else f"{cpu_model()}, {os.cpu_count()} cores"
    ) + f", load average {load:.1f} at start"


def matmul_flops_jax(n: int = 2048, rounds: int = 5) -> float:
    """Measured fp32 FLOP/s of one n x n matmul under jit on the default device (best of `rounds`)."""

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    times = alternate({"mm": lambda: f(a, b).block_until_ready()}, rounds=rounds, warmup=2)["mm"]
    return 2 * n**3 / min(times)


def matmul_flops_torch(n: int = 2048, rounds: int = 5) -> float:
    """Measured fp32 FLOP/s of one n x n matmul in PyTorch on the CPU (best of `rounds`)."""
    import torch  # noqa: PLC0415 (optional: the interop extra)

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    times = alternate({"mm": lambda: torch.mm(a, b)}, rounds=rounds, warmup=2)["mm"]
    return 2 * n**3 / min(times)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (also what the scripts print)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells, the table has {len(headers)} columns")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def append_section(title: str, body: str, path: str = BENCHMARKS) -> str:
    """Appends '## title (YYYY-MM-DD)' + body to BENCHMARKS.md under an exclusive lock (other scripts
    append to the same file); returns the section text."""
    section = f"\n## {title} ({datetime.date.today().isoformat()})\n\n{body.strip()}\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(section)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return section


def fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"
