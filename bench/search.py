"""Vector search for echoclip_jax.search: build and query time and recall@10 of the approximate (IVF) index
against exact search, at archive sizes of 10k, 100k and 1M embeddings of the model's width (512).

    python bench/search.py [--sizes 10000,100000,1000000] [--dim 512] [--queries 1000] [--nprobe 8,16,32,64]
        [--hnsw_up_to 100000] [--data clustered|random] [--no_append]

Embeddings: synthetic, L2-normalised, clustered (n/100 cluster centres, at least 100, each vector a centre
plus Gaussian noise of --noise times its norm; at 1.5 a query's nearest neighbour has cosine ~0.4 and its 10th
~0.35, a hard case: at 1.0 every index finds all 10), or uniform on the sphere (--data random, the worst case
for any approximate index). Queries are fresh draws from the same distribution. Each index is the one
echoclip_jax.retrieval.vectors builds (exact: IndexFlatIP; ivf: IndexIVFFlat, nlist ~ sqrt(n), k-means on 64
points per cell); HNSW (faiss IndexHNSWFlat, M=32, efConstruction 40, efSearch 64) is timed up to --hnsw_up_to
vectors for comparison. Times are wall-clock on this machine in one process (exact and approximate alternate
per size, so they share its load): batch query time per query over all queries, and the single-query latency
(median of 20 one-query calls on one thread)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import faiss

from bench import common  # noqa: E402
from echoclip_jax.retrieval.vectors import VectorIndex, default_nprobe, recall_at_k  # noqa: E402


def embeddings(
    rng, n: int, dim: int, kind: str, centres=None, noise: float = 1.5, chunk: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [n, dim] float32 L2-normalised, the cluster centres used), generated in chunks."""
    if kind == "clustered" and centres is None:
        c = rng.standard_normal((max(100, n // 100), dim), dtype=np.float32)
        centres = c / np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            x = x * np.float32(noise / np.sqrt(dim)) + centres[rng.integers(0, len(centres), m)]
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def latency(index, queries, k, calls: int = 20) -> float:
    """Median seconds of a one-query call, on one thread (on a shared machine, OpenMP threads waiting for
    busy cores made one flat query of 10k vectors take 40 ms instead of 0.3)."""

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for i in range(calls):
            _, t = timed(lambda: index.search(queries[i : i + 1], k))
            times.append(t)
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.median(times))


def hnsw(x: np.ndarray):
    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.add(x)
    index.hnsw.efSearch = 64
    return index


def run_size(n: int, args, rng) -> list[list]:
    x, centres = embeddings(rng, n, args.dim, args.data, noise=args.noise)
    q, _ = embeddings(rng, args.queries, args.dim, args.data, centres, noise=args.noise)
    keys = np.arange(n)
    exact, t_exact_build = timed(lambda: VectorIndex.build(x, keys, kind="exact"))
    (_, truth), t_exact_q = timed(lambda: exact.search(q, args.k))
    lat_exact = latency(exact, q, args.k)
    exact = None  # freed before the IVF build
    ivf, t_ivf_build = timed(lambda: VectorIndex.build(x, keys, kind="ivf"))
    rows = [
        [
            f"{n:,}",
            "exact (flat)",
            "-",
            f"{t_exact_build:.2f}",
            f"{t_exact_q / len(q) * 1e3:.3f}",
            f"{lat_exact * 1e3:.2f}",
            "1.000",
            "1.0x",
            "1.0x",
        ]
    ]
    default = default_nprobe(ivf.nlist)
    for nprobe in sorted(set(args.nprobe) | {default}):
        if nprobe > ivf.nlist:
            continue
        ivf.set_nprobe(nprobe)
        (_, found), t_q = timed(lambda: ivf.search(q, args.k))
        lat = latency(ivf, q, args.k)
        mark = " (default)" if nprobe == default else ""
        rows.append(
            [
                f"{n:,}",
                f"IVF nlist {ivf.nlist}",
                f"{nprobe}{mark}",
                f"{t_ivf_build:.2f}",
                f"{t_q / len(q) * 1e3:.3f}",
                f"{lat * 1e3:.2f}",
                f"{recall_at_k(found, truth):.3f}",
                f"{t_exact_q / t_q:.1f}x",
                f"{lat_exact / lat:.1f}x",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    ivf = None  # freed before the next size
    if n <= args.hnsw_up_to:
        index, t_build = timed(lambda: hnsw(x))
        (_, found), t_q = timed(lambda: index.search(q, args.k))
        lat = latency(index, q, args.k)
        rows.append(
            [
                f"{n:,}",
                "HNSW M=32",
                "efSearch 64",
                f"{t_build:.2f}",
                f"{t_q / len(q) * 1e3:.3f}",
                f"{lat * 1e3:.2f}",
                f"{recall_at_k(found, truth):.3f}",
                f"{t_exact_q / t_q:.1f}x",
                f"{lat_exact / lat:.1f}x",
            ]
        )
        del index
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", default="8,16,32,64")
    p.add_argument("--hnsw_up_to", type=int, default=100_000, help="time faiss HNSW up to this many vectors")
    p.add_argument("--data", choices=("clustered", "random"), default="clustered")
    p.add_argument("--noise", type=float, default=1.5, help="clustered: noise norm relative to the centre's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_append", action="store_true", help="print the section, do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    args.nprobe = [int(v) for v in args.nprobe.split(",")]

    machine = common.machine()
    rng = np.random.default_rng(args.seed)
    headers = [
        "vectors",
        "index",
        "nprobe",
        "build s",
        "query ms (batch, per query)",
        "query ms (one)",
        f"recall@{args.k}",
        "batch speed-up vs exact",
        "one-query speed-up vs exact",
    ]
    rows, start = [], time.perf_counter()
    for n in [int(s) for s in args.sizes.split(",")]:
        rows += run_size(n, args, rng)
    body = (
        f"Machine: {machine}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads. "
        f"`python bench/search.py --sizes {args.sizes} --queries {args.queries} --data {args.data}"
        f"{f' --noise {args.noise}' if args.data == 'clustered' else ''}`: "
        f"{args.data} L2-normalised embeddings of width {args.dim}, {args.queries} fresh queries, top {args.k}; "
        f"recall against exact search in the same run; {time.perf_counter() - start:.0f} s in all.\n\n"
        + common.table(headers, rows)
    )
    print(body)
    if not args.no_append:
        common.append_section("search: exact vs approximate vector search (echoclip_jax.search)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
