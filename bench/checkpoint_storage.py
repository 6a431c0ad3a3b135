"""Checkpoint save and restore time to a bucket (gs://) against local disk: the same train state, the same
Checkpointer (Orbax, async save then wait), in one process, rounds of local / bucket in turn, median.

    python bench/checkpoint_storage.py                         # the echoclip config's train state
    python bench/checkpoint_storage.py --configs tiny,echoclip --rounds 3

The bucket is fake-gcs-server on 127.0.0.1 (tests/gcs_server.py, the tests' server, started here), which
stores its objects on this machine's disk: the ratio is what the GCS protocol (tensorstore's uploads, the
commit file, the listings) costs over writing the files directly, not a real bucket's bandwidth. A real
bucket takes ~30-100 ms per request and tens to hundreds of MB/s per stream; Orbax (OCDBT) writes a few
large files per host, so a pod slice's save is bounded by each host's upload bandwidth, in parallel.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/data_prep.py shadows data_prep

import pathlib

import jax
import numpy as np

from bench import common
from echoclip_jax.config import files
from echoclip_jax.runtime import sharding
from echoclip_jax.training import checkpoint as ckpt_lib
from echoclip_jax.training.step import build_train_step, initial_params
from tests.gcs_server import FakeGcs

CONFIGS = pathlib.Path(REPO) / "configs"


class _Position:
    """A data-iterator stand-in: the grain state a real run saves beside the arrays (a few bytes)."""

    def get_state(self):
        return {"next_index": 0}


def train_state(name: str):
    c = files.load(CONFIGS / f"{name}.py")
    c.batch_size = 8
    c.init.kind = "random"
    mesh = sharding.build_mesh(c.mesh, jax.devices())
    ts = build_train_step(c, mesh, 100)
    state = ts.init_state(initial_params(c, ts.abs_params, ts.param_sh))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return state, ts.abs_state, nbytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="echoclip")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no_append", action="store_true")
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="echoclip_ckpt_bench_")
    server = FakeGcs(pathlib.Path(work) / "objects")
    os.environ.update(server.env)
    server.start()
    rows = []
    try:
        bucket = server.bucket("bench")
        for name in args.configs.split(","):
            state, abstract, nbytes = train_state(name)
            roots = {"local disk": os.path.join(work, f"local_{name}"), "bucket": f"{bucket}/{name}"}
            saves = {k: [] for k in roots}
            restores = {k: [] for k in roots}
            step = 0
            for r in range(args.rounds + 1):  # round 0 warms up (Orbax's first save builds its handlers)
                step += 1
                for where, root in roots.items():
                    c = ckpt_lib.Checkpointer(root, keep=2)
                    t = time.perf_counter()
                    c.save(step, state, _Position())
                    c.wait()
                    t_save = time.perf_counter() - t
                    t = time.perf_counter()
                    restored = c.restore(step, abstract)
                    jax.block_until_ready(restored)
                    t_restore = time.perf_counter() - t
                    c.close()
                    if r:
                        saves[where].append(t_save)
                        restores[where].append(t_restore)
                    del restored
            back = ckpt_lib.Checkpointer(roots["bucket"], keep=2).restore(step, abstract)
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):  # the bucket's copy is the state
                assert np.array_equal(np.asarray(a), np.asarray(b))
            for where in roots:
                s, rs = common.median(saves[where]), common.median(restores[where])
                rows.append(
                    [
                        f"{name} ({nbytes / 2**20:.0f} MiB)",
                        where,
                        f"{s:.2f} s ({min(saves[where]):.2f}-{max(saves[where]):.2f})",
                        f"{nbytes / 2**20 / s:.0f} MiB/s",
                        f"{rs:.2f} s ({min(restores[where]):.2f}-{max(restores[where]):.2f})",
                        f"{s / common.median(saves['local disk']):.2f}x",
                    ]
                )
    finally:
        server.stop()
    body = (
        f"Machine: {common.machine()}; {len(jax.devices())} CPU device(s). The train state (params + AdamW "
        f"moments, fp32) saved by echoclip_jax.training.checkpoint.Checkpointer (async save + wait, i.e. until "
        f"committed) and restored onto the same shardings; {args.rounds} rounds after a warm-up, local and "
        f"bucket in turn, median (min-max). Bucket: fake-gcs-server on 127.0.0.1 storing on the same disk.\n\n"
    )
    body += common.table(["state", "where", "save", "save rate", "restore", "save vs local"], rows)
    print(body)
    if not args.no_append:
        common.append_section("checkpoint save and restore: bucket (gs://) vs local disk", body)


if __name__ == "__main__":
    main()
