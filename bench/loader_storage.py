"""Samples/s of the training loader reading its records from a bucket (gs://) against local disk: the same
records and batches, in one process, each variant a fresh loader timed in its steady state, rounds of every
variant in turn; and what the step demands.

    python bench/loader_storage.py                                    # 224 px, 32 frames, batch 32
    python bench/loader_storage.py --latency_ms 0,20,50 --workers 0,2 --batch 64 --batches 96

The bucket is fake-gcs-server on 127.0.0.1 (tests/gcs_server.py, the tests' server), started here, behind a
TCP proxy (its own process) that holds every chunk a client sends for --latency_ms before passing it on: a
real bucket answers a request in tens of ms, this server in well under one. The proxy also counts the
connections the clients open (gcsfs keeps one per GET in flight and reuses it), so the table shows the
concurrency the loader keeps in flight. "one at a time" reads the same records one GET after another
(no loader), the rate a reader without concurrency would get at that latency.

Records: the synthetic cohort through data_prep.convert at --size px with 32 frames kept (cached under --work,
as bench/input_pipeline.py makes them), copied to the bucket. Loader: configs/echoclip.py's data settings
(one random frame per video, its augmentation, CLIP BPE tokens) at --batch, the global batch as a jax.Array.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/data_prep.py shadows data_prep

import pathlib

import jax

from bench import common
from bench.input_pipeline import make_records
from echoclip_jax.config import files
from echoclip_jax.data import loader as data
from echoclip_jax.runtime import sharding, storage
from tests.gcs_server import FakeGcs, free_port

CONFIGS = pathlib.Path(REPO) / "configs"
# What the step consumes, from BENCHMARKS.md (samples/s): the tiny step on this 2-core CPU (2026-12-07), and
# the compiled echoclip step per TPU host (4 chips a host), roofline predictions of `aot` (2026-12-02).
DEMAND = {
    "tiny step, 2-core CPU": 110,
    "echoclip, v5e-16 dp, per host": 8_704 / 4,
    "echoclip, v5p-32 fsdp, per host": 26_972 / 4,
}


# ------------------------------------------------------------------------------------ latency proxy


def _proxy(port: int, upstream: int, delay_ms, connections, peak) -> None:
    """Forwards 127.0.0.1:port to 127.0.0.1:upstream; each chunk from the client waits delay_ms first."""

    async def pipe(reader, writer, delayed: bool):
        try:
            while chunk := await reader.read(1 << 16):
                if delayed and delay_ms.value:
                    await asyncio.sleep(delay_ms.value / 1e3)
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        with connections.get_lock():
            connections.value += 1
            peak.value = max(peak.value, connections.value)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(client_reader, up_writer, True), pipe(up_reader, client_writer, False))
        with connections.get_lock():
            connections.value -= 1

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class Bucket:
    """fake-gcs-server behind the latency proxy; the clients of this process and its children use the proxy."""

    def __init__(self, root: str):
        self.server = FakeGcs(pathlib.Path(root))
        ctx = multiprocessing.get_context("spawn")
        self.delay_ms, self.connections, self.peak = ctx.Value("d", 0.0), ctx.Value("i", 0), ctx.Value("i", 0)
        self.port = free_port()
        self.proxy = ctx.Process(
            target=_proxy, args=(self.port, self.server.port, self.delay_ms, self.connections, self.peak), daemon=True
        )

    def __enter__(self) -> "Bucket":
        os.environ.update(self.server.env)
        self.server.start()
        self.proxy.start()
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{self.port}"  # read when gcsfs is first used
        return self

    def __exit__(self, *exc) -> None:
        self.proxy.terminate()
        self.server.stop()


# ------------------------------------------------------------------------------------------ timing


def loader_config(data_dir: str, batch: int, workers: int, batches: int):
    c = files.load(CONFIGS / "echoclip.py")  # its data, augmentation and tokenizer settings
    c.data_dir, c.batch_size, c.total_steps, c.data.num_workers = data_dir, batch, batches, workers
    return c


def loader_rate(config, mesh, bucket: Bucket, latency_ms: float, batches: int) -> tuple[float, float]:
    """(samples/s, this process's CPU seconds per sample) of a fresh loader in its steady state: warmed up
    past its read-ahead (what grain buffers while nothing is pulled would flatter it), then `batches`
    consecutive batches timed; then closed, so no loader reads while another is timed."""
    bucket.delay_ms.value = latency_ms
    loader = data.train_loader(config, mesh)
    threads = data.WORKER_READ_THREADS if int(config.data.num_workers) else data.READ_THREADS
    for _ in range(data.READ_AHEAD * threads + threads):
        next(loader)["images"].block_until_ready()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(loader)["images"].block_until_ready()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    loader.iterator.close()
    n = config.batch_size * batches
    return n / seconds, cpu / n


def one_at_a_time_rate(source: data.ShardedRecords, bucket: Bucket, latency_ms: float, n: int):
    """(records/s, CPU seconds per record) read one ranged GET after another (no loader, no concurrency)."""
    bucket.delay_ms.value = latency_ms
    source[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        source[(7 * i) % len(source)]
    return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/echoclip_bench", help="cache for the cohort and records")
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--size", type=int, default=224, help="records' and the model's image size (echoclip: 224)")
    ap.add_argument("--latency_ms", default="0,20", help="added to every request to the bucket")
    ap.add_argument("--workers", default="0", help="data.num_workers values (mp_prefetch processes)")
    ap.add_argument("--batch", type=int, default=32, help="global batch (one process reads all of it)")
    ap.add_argument("--batches", type=int, default=128, help="consecutive batches timed per loader (>> its read-ahead)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one_at_a_time", type=int, default=32, help="records timed for the no-loader reader")
    ap.add_argument("--no_append", action="store_true")
    args = ap.parse_args(argv)

    os.makedirs(args.work, exist_ok=True)
    local = make_records(args.work, args.patients, args.size)
    record_kib = sum(storage.size(p) for p in data.ShardedRecords(local, "train").paths) / 1024
    num_records = len(data.ShardedRecords(local, "train"))
    latencies = [float(x) for x in args.latency_ms.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    mesh = sharding.build_mesh(loader_config(local, args.batch, 0, 1).mesh, jax.devices()[:1])
    total = 64 * args.batches + 100  # enough batches for the warm-up and the timed ones
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="echoclip-gcs-") as root, Bucket(root) as bucket:
        remote = storage.join(bucket.server.bucket("bench"), "records")
        storage.copytree(local, remote)
        source = data.ShardedRecords(remote, "train")
        for _ in range(args.rounds):  # rounds of every variant in turn: the machine's noise spread alike
            for w in workers:
                label = f"local disk, {w} workers"
                rate = loader_rate(loader_config(local, args.batch, w, total), mesh, bucket, 0, args.batches)
                rates.setdefault(label, []).append(rate)
                for ms in latencies:
                    label = f"bucket +{ms:g} ms, {w} workers"
                    rate = loader_rate(loader_config(remote, args.batch, w, total), mesh, bucket, ms, args.batches)
                    rates.setdefault(label, []).append(rate)
            for ms in latencies:
                label = f"bucket +{ms:g} ms, one GET at a time (no loader)"
                rates.setdefault(label, []).append(one_at_a_time_rate(source, bucket, ms, args.one_at_a_time))
        peak = bucket.peak.value
    rows, local_rate = [], {}
    for label, rs in rates.items():
        rate, cpu = common.median([r for r, _ in rs]), common.median([c for _, c in rs])
        w = int(label.split(", ")[1].split()[0]) if label.endswith("workers") else None
        if label.startswith("local"):
            local_rate[w] = rate
        vs_local = f"{rate / local_rate[w]:.2f}x" if w is not None else "-"
        demand = [f"{rate / d:.2f}x" for d in DEMAND.values()]
        rows.append([label, common.fmt_rate(rate), vs_local, f"{cpu * 1e3:.2f}"] + demand)

    body = (
        f"Machine: {common.machine()}. `{' '.join(['python bench/loader_storage.py', *(argv or sys.argv[1:])])}`. "
        f"{num_records} synthetic videos (--small, {args.patients} patients), {args.size} px, 32 JPEG frames kept "
        f"({record_kib / num_records:.0f} KiB a record); configs/echoclip.py's loader (one random frame, its "
        f"augmentation, CLIP BPE) at global batch {args.batch}, one process; per variant a fresh loader warmed past "
        f"its read-ahead, then {args.batches} consecutive batches timed; {args.rounds} rounds of every variant in "
        f"turn, median. The bucket is fake-gcs-server on "
        f"127.0.0.1 behind a proxy adding the latency shown to every request; peak connections the clients held "
        f"open to it: {peak} (gcsfs holds one per GET in flight). The server and the proxy share this machine's "
        f"cores with the loader (a real bucket's do not); 'CPU ms/sample' is the bench process's own CPU time "
        f"(the loader in-process: reads, decoding, augmentation, tokens) per sample, less sensitive to the "
        f"machine's other users than samples/s.\n\n"
    )
    headers = ["what", "samples/s", "vs local disk", "CPU ms/sample (this process)"]
    headers += [f"vs {k} ({v:,.0f}/s)" for k, v in DEMAND.items()]
    body += common.table(headers, rows)
    body += (
        "\n\nDemand: the tiny step on a 2-core CPU (train step table of 2026-12-07) and the echoclip step's roofline "
        "prediction per TPU host (aot tables of 2026-12-02: v5e-16 dp 8,704 samples/s and v5p-32 fsdp 26,972/s, 4 "
        "hosts each; each host's loader reads only its slice of the global batch). A TPU host has 100+ cores against "
        "this machine's 2 shared ones: per-core rate x cores is its supply. Concurrency in flight: one process "
        f"computes {data.READ_THREADS} batches at once (grain ReadOptions), each batch's GETs all in flight together, "
        "so up to 16 x its slice of the batch, bounded by gcsfs's pool of 100 connections per process; with "
        f"data.num_workers each worker process runs {data.WORKER_READ_THREADS} such threads and its own pool. A real "
        "bucket differs from this one: tens of ms to the first byte of each GET (the proxy's added latency stands for "
        "it), a per-connection throughput of tens to a few hundred MB/s, and each record is read whole (all its "
        "frames) to use one frame, so the bytes per sample are the record's size."
    )
    print(body)
    if not args.no_append:
        common.append_section("input pipeline from a bucket: the loader's samples/s vs local disk", body)


if __name__ == "__main__":
    main()
