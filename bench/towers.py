"""Where the train step's time goes: each tower's forward and forward+backward, ours (jitted) vs open_clip's
PyTorch modules with the same weights, alternated in one process; wall time and process CPU time.

    python bench/towers.py                    # tiny config, batch 32
    python bench/towers.py --config echoclip --batch 2 --rounds 3

The loss is sum(features * a fixed random matrix), so the backward gets a dense cotangent; gradients are
taken w.r.t. the tower's parameters (and, in PyTorch, accumulated into .grad as a training step does).
CPU time (user + system of this process) is the steadier figure on a shared machine, where wall time
mostly measures the other users; PyTorch's OpenMP threads spin while they wait, so under load its CPU time
is inflated too: compare ours with ours across changes, and against PyTorch only on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/data_prep.py shadows data_prep

import jax
import jax.numpy as jnp
import numpy as np  # noqa: E402
from flax import nnx

from bench import common  # noqa: E402
from bench.train_step import flatten, load_config, synthetic_batch  # noqa: E402
from echoclip_jax import models
from echoclip_jax.weights import open_clip as ocw


def with_cpu_time(fn, log: list):
    """fn, also appending its process CPU seconds per call to `log`."""

    def timed():
        c0 = time.process_time()
        fn()
        log.append(time.process_time() - c0)

    return timed


def jax_tower_fns(config, batch) -> tuple[dict, dict]:
    """{"text fwd", "text fwd+bwd", "image ..."} -> blocking callables on our model; and its params."""

    model = models.build_model(config.model, rngs=nnx.Rngs(config.seed))
    model.train()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    inputs = {"text": jnp.asarray(batch["tokens"]), "visual": models.preprocess_images(batch["images"])}
    w = jnp.asarray(np.random.default_rng(0).standard_normal((config.batch_size, config.model.embed_dim)), jnp.float32)
    fns = {}
    for tower, label in (("text", "text"), ("visual", "image")):

        def loss(sub, tower=tower):
            m = nnx.merge(graph, {**params, tower: sub}, rest)
            x = inputs[tower]
            feats = m.encode_text(x, normalize=False) if tower == "text" else m.encode_image(x, normalize=False)
            return jnp.sum(feats * w)

        fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
        fns[f"{label} fwd"] = lambda f=fwd, t=tower: jax.block_until_ready(f(params[t]))
        fns[f"{label} fwd+bwd"] = lambda f=grad, t=tower: jax.block_until_ready(f(params[t]))
    return fns, params


def torch_tower_fns(config, batch, params) -> dict:
    """The same four callables on open_clip.CLIP loaded (strictly) with our weights."""
    import open_clip  # noqa: PLC0415 (optional: the interop extra)
    import torch  # noqa: PLC0415 (optional: the interop extra)

    torch.set_num_threads(os.cpu_count())
    model = open_clip.CLIP(**ocw.open_clip_model_cfg(config.model))
    sd = ocw.export_state_dict({k: np.asarray(v) for k, v in flatten(params).items()}, config.model)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    model.train()
    tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
    images = torch.from_numpy(np.array(models.preprocess_images(batch["images"]))).permute(0, 3, 1, 2).contiguous()
    w = torch.from_numpy(
        np.random.default_rng(0).standard_normal((config.batch_size, config.model.embed_dim)).astype(np.float32)
    )
    encode = {"text": lambda: model.encode_text(tokens), "image": lambda: model.encode_image(images)}
    fns = {}
    for label, enc in encode.items():

        def fwd(enc=enc):
            with torch.no_grad():
                return float((enc() * w).sum())

        def fwd_bwd(enc=enc):
            model.zero_grad(set_to_none=True)
            loss = (enc() * w).sum()
            loss.backward()
            return loss.item()

        fns[f"{label} fwd"], fns[f"{label} fwd+bwd"] = fwd, fwd_bwd
    return fns


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--impl", default="auto", help="model.vision.depthwise_impl")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no_append", action="store_true")
    args = ap.parse_args(argv)

    config = load_config(args.config, args.batch, "float32", args.impl)
    batch = synthetic_batch(config)
    ours, params = jax_tower_fns(config, batch)
    theirs = torch_tower_fns(config, batch, params)
    fns, cpu = {}, {}
    for part in ours:
        for who, table in (("ours", ours), ("open_clip", theirs)):
            cpu[(part, who)] = []
            fns[(part, who)] = with_cpu_time(table[part], cpu[(part, who)])
    header = f"Machine: {common.machine()}."
    print(header, flush=True)
    times = common.alternate(fns, rounds=args.rounds, warmup=2, pause=0.5)
    rows = []
    for part in ours:
        t_ours, t_theirs = (common.median(times[(part, w)]) for w in ("ours", "open_clip"))
        c_ours, c_theirs = (statistics.median(cpu[(part, w)][-args.rounds :]) for w in ("ours", "open_clip"))
        rows.append(
            [
                part,
                common.spread(times[(part, "ours")]),
                common.spread(times[(part, "open_clip")]),
                f"{t_theirs / t_ours:.2f}x",
                f"{c_ours * 1e3:.0f} ms",
                f"{c_theirs * 1e3:.0f} ms",
                f"{c_theirs / c_ours:.2f}x",
            ]
        )
    body = (
        f"{header} Config {args.config}, batch {args.batch}, fp32, depthwise_impl {args.impl}; "
        f"{args.rounds} alternating rounds after a warm-up, median (min-max).\n\n"
        + common.table(
            ["part", "ours wall", "open_clip wall", "wall ratio", "ours CPU", "open_clip CPU", "CPU ratio"], rows
        )
        + "\n\nRatios are open_clip / ours (>= 1: ours is at least as fast). CPU = this process's user + "
        "system time per call."
    )
    print(body)
    if not args.no_append:
        common.append_section(f"towers: ours vs open_clip, {args.config} batch {args.batch}", body)


if __name__ == "__main__":
    main()
