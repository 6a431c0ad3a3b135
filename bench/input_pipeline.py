"""Samples/s of the grain loader (echoclip_jax.data) from TFRecords, in-process and with mp_prefetch
workers, against what the train step consumes on the same cores (the tiny step, alternated with it).

    python bench/input_pipeline.py                          # 64 and 224 px records, 0 and 2 workers
    python bench/input_pipeline.py --patients 24 --workers 0,1,2 --batches 20 --sizes 224

Records are made once (cached under --work) from the synthetic cohort with data_prep.convert (--small
videos, 32 frames kept, image 64 and 224). The loader is the training one (random frame, augmentation,
tokenisation, global batch as a jax.Array). Target: loader >= 2x the step's demand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/data_prep.py shadows data_prep

import pathlib

import jax

from bench import common  # noqa: E402
from bench.train_step import JaxStep, load_config
from echoclip_jax.config import files
from echoclip_jax.data import loader as data
from echoclip_jax.runtime import sharding

CONFIGS = pathlib.Path(REPO) / "configs"


def make_records(work: str, patients: int, size: int) -> str:
    """Synthetic cohort -> records at `size` px (both cached: re-runs reuse them)."""
    cohort = os.path.join(work, f"cohort_{patients}")
    if not os.path.exists(os.path.join(cohort, "reports.csv")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.synthetic",
                "--out",
                cohort,
                "--patients",
                str(patients),
                "--seed",
                "0",
                "--small",
            ],
            check=True,
            cwd=REPO,
        )
    out = os.path.join(work, f"records_{patients}_{size}")
    if not os.path.exists(os.path.join(out, "dataset_info.json")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.convert",
                "--dicom_dir",
                os.path.join(cohort, "dicom"),
                "--reports",
                os.path.join(cohort, "reports.csv"),
                "--out",
                out,
                "--image_size",
                str(size),
                "--frames",
                "32",
                "--split_fractions",
                "1,0,0",
                "--salt",
                "bench-synthetic-cohort",
            ],
            check=True,
            cwd=REPO,
        )
    return out


def loader_config(data_dir: str, size: int, batch: int, workers: int, batches: int):
    c = files.load(CONFIGS / "tiny.py")
    c.data_dir = data_dir
    c.batch_size = batch
    c.total_steps = batches
    c.model.vision.image_size = size
    c.data.num_workers = workers
    c.data.augment.random_resized_crop = (0.9, 1.0)  # the paper-style augmentation, the costlier path
    return c


class LoaderBatches:
    """Callable: pulls the next global batch (blocking until it is a jax.Array)."""

    def __init__(self, config, mesh, pulls: int):
        self.loader = data.train_loader(config, mesh)
        self.pulls = pulls  # consecutive batches per call: grain's read-ahead threads cannot hide the cost

    def __call__(self):
        for _ in range(self.pulls):
            next(self.loader)["images"].block_until_ready()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/echoclip_bench", help="cache for the cohort and records")
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--workers", default="0,2", help="mp_prefetch worker counts (0 = in-process)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="consecutive batches per timed loader call")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (loader calls and one step each)")
    ap.add_argument("--impl", default="auto", help="depthwise_impl of the tiny step that sets the demand")
    ap.add_argument("--no_append", action="store_true")
    args = ap.parse_args(argv)

    os.makedirs(args.work, exist_ok=True)
    cores = os.cpu_count()
    mesh = sharding.build_mesh(load_config("tiny", args.batch, "float32", args.impl).mesh, jax.devices()[:1])
    step = JaxStep(load_config("tiny", args.batch, "float32", args.impl), jax.devices()[0])
    rows, ratios = [], []
    for size in [int(s) for s in args.sizes.split(",")]:
        data_dir = make_records(args.work, args.patients, size)
        fns = {}
        for w in [int(x) for x in args.workers.split(",")]:
            cfg = loader_config(data_dir, size, args.batch, w, (args.rounds + 2) * args.batches)
            fns[f"loader {size}px, {w} workers"] = LoaderBatches(cfg, mesh, args.batches)
        if size == 64:
            fns["tiny train step (64px)"] = step
        # warm-up 1 call (= --batches batches): the first batches of a worker pool pay for starting it
        times = common.alternate(fns, rounds=args.rounds, warmup=1)
        demand = args.batch / common.median(times["tiny train step (64px)"]) if size == 64 else None
        for label, ts in times.items():
            rate = args.batch * (args.batches if label.startswith("loader") else 1) / common.median(ts)
            if label.startswith("loader"):
                w = int(label.split(", ")[1].split()[0])
                used = min(max(w, 1), cores)
                rows.append(
                    [
                        label,
                        common.fmt_rate(rate),
                        common.fmt_rate(rate / used),
                        used,
                        f"{rate / demand:.1f}x" if demand else "-",
                    ]
                )
                if demand:
                    ratios.append((label, rate / demand))
            else:
                rows.append([label, common.fmt_rate(rate), "-", cores, "1.0x"])

    body = (
        f"Machine: {common.machine()}. {args.patients} synthetic patients (--small), 32 frames kept per video; "
        f"global batch {args.batch}; random frame + random resized crop + brightness/contrast + clip_bpe "
        f"tokens; {args.rounds} alternating rounds of {args.batches} consecutive batches per loader (one step "
        f"for the step) after a warm-up round, median. grain's in-process read-ahead threads keep filling "
        f"while the step runs, so the in-process figure is an upper bound on the loader's own rate.\n\n"
    )
    body += common.table(["what", "samples/s", "samples/s per core", "cores used", "vs tiny step demand"], rows)
    body += (
        "\n\n'cores used' counts the worker processes (or the one in-process thread), capped at the "
        "machine's cores; with workers the main process also converts batches to jax.Arrays. The step's "
        "demand is the tiny config's jitted step on the same machine, timed alternately with the loader. "
        "At 224 px the GPU step's demand was not measured here (no GPU); per-core samples/s x host cores "
        "gives a host's supply."
    )
    print(body)
    if not args.no_append:
        common.append_section("input pipeline: grain loader vs the train step", body)
    return ratios


if __name__ == "__main__":
    main()
