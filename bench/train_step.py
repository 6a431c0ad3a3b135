"""Train-step throughput: our jitted step vs open_clip's PyTorch step, same architecture, batch, precision
and AdamW, alternated A/B/A/B in one process; FLOPs from the compiled step and MFU against this
machine's measured matmul peak.

    python bench/train_step.py                       # tiny (batch 32) and echoclip (batch 2), fp32, CPU
    python bench/train_step.py --configs echoclip --batch 4 --impls shifted,lax --rounds 5
    python bench/train_step.py --configs echoclip --dtype bfloat16 --batch 256 --no_torch   # on a GPU host

The PyTorch model is open_clip.CLIP built from our config through echoclip_jax.weights.open_clip and
loaded (strictly) with our initial weights, so a layout mismatch fails loudly instead of timing a
different network. MFU on CPU uses the fp32 matmul peak measured here; on a GPU the bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import os
import sys
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
from echoclip_jax.training import step as step_lib
from echoclip_jax.weights import open_clip as ocw

CONFIG_DIR = pathlib.Path(REPO) / "configs"
CONFIGS = {"tiny": 32, "echoclip": 2}  # config name -> default batch on this CPU


def load_config(name: str, batch: int, dtype: str, impl: str):
    c = files.load(CONFIG_DIR / f"{name}.py")
    c.batch_size = batch
    c.model.dtype = dtype
    c.model.vision.depthwise_impl = impl
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.sharding_preset = "dp"
    c.init.kind = "random"
    c.optim.warmup_steps = 10
    return c


def synthetic_batch(config, seed: int = 0) -> dict:
    """uint8 images and CLIP-BPE-like tokens (SOT ... EOT, EOT the largest id so argmax pooling finds it)."""
    rng = np.random.default_rng(seed)
    b, s, ctx = config.batch_size, config.model.vision.image_size, config.model.text.context_length
    vocab = config.model.text.vocab_size
    tokens = np.zeros((b, ctx), np.int32)
    for i in range(b):
        n = int(rng.integers(8, ctx - 1))
        tokens[i, 0] = vocab - 2
        tokens[i, 1:n] = rng.integers(1, vocab - 2, n - 1)
        tokens[i, n] = vocab - 1
    return {"images": rng.integers(0, 256, (b, s, s, 3), np.uint8), "tokens": tokens}


def flatten(tree: dict, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


class JaxStep:
    """Our train step (echoclip_jax.training.step.build_train_step) on one device, compiled once."""

    def __init__(self, config, device):
        mesh = sharding.build_mesh(config.mesh, [device])
        ts = step_lib.build_train_step(config, mesh, 1000)
        self.params0 = step_lib.initial_params(config, ts.abs_params, ts.param_sh)
        self.batch = jax.device_put(synthetic_batch(config), ts.batch_sh)
        self.state = ts.init_state(self.params0)
        t0 = time.perf_counter()
        self.compiled = ts.step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost["flops"]) if cost and cost.get("flops") else float("nan")

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        metrics["loss"].block_until_ready()
        self.state["step"].block_until_ready()

    def params_numpy(self) -> dict:
        return {k: np.asarray(v) for k, v in flatten(self.params0).items()}


class TorchStep:
    """open_clip's CLIP with timm ConvNeXt, ClipLoss, AdamW and grad clipping: the reference training step."""

    def __init__(self, config, params: dict):
        import open_clip  # noqa: PLC0415 (optional: the interop extra)
        import torch  # noqa: PLC0415 (optional: the interop extra)

        torch.set_num_threads(os.cpu_count())
        self.torch = torch
        self.model = open_clip.CLIP(**ocw.open_clip_model_cfg(config.model))
        sd = ocw.export_state_dict(params, config.model)
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
        self.model.train()
        o = config.optim
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.loss = open_clip.ClipLoss()
        self.clip = float(o.grad_clip_norm)
        self.max_ls = float(config.loss.max_logit_scale)
        batch = synthetic_batch(config)
        self.images = torch.from_numpy(batch["images"])
        self.tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def __call__(self):
        torch = self.torch
        images = (self.images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std  # as our preprocess
        img = self.model.encode_image(images, normalize=True)
        txt = self.model.encode_text(self.tokens, normalize=True)
        loss = self.loss(img, txt, self.model.logit_scale.exp())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.max_ls)
        return loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,echoclip", help="comma-separated configs/*.py names")
    ap.add_argument("--batch", type=int, default=0, help="batch for every config (default: tiny 32, echoclip 2)")
    ap.add_argument("--dtype", default="float32", help="model compute dtype (bfloat16 on a GPU)")
    ap.add_argument(
        "--impls",
        default="auto,shifted",
        help="depthwise_impl values to time (auto: per backend and feature-map size; lax: slow on CPU)",
    )
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (one step of each per round)")
    ap.add_argument("--matmul", type=int, default=2048, help="n of the n x n matmul that measures the peak")
    ap.add_argument("--no_torch", action="store_true", help="skip open_clip (e.g. on a GPU host without it)")
    ap.add_argument("--no_append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)

    device = jax.devices()[0]
    backend = jax.default_backend()
    lines = [
        f"Machine: {common.machine()}; JAX backend {backend} ({device.device_kind}), 1 device, "
        f"dtype {args.dtype}, AdamW + grad clipping + CLIP loss, synthetic batch; {args.rounds} alternating "
        f"rounds after a warm-up, 1 s idle before each timed step, median step time (min-max)."
    ]
    peak_jax = common.matmul_flops_jax(args.matmul)
    peak_torch = None if args.no_torch else common.matmul_flops_torch(args.matmul)
    lines.append(
        f"Measured fp32 {args.matmul}^3 matmul peak: JAX {peak_jax / 1e9:.1f} GFLOP/s"
        + ("" if peak_torch is None else f", PyTorch {peak_torch / 1e9:.1f} GFLOP/s")
        + "."
    )

    rows, ratios = [], []
    for name in args.configs.split(","):
        batch = args.batch or CONFIGS.get(name, 2)
        impls = [i.strip() for i in args.impls.split(",")]
        steps, compile_s = {}, {}
        for impl in impls:
            config = load_config(name, batch, args.dtype, impl)
            label = f"jax {impl}"
            print(f"[{name}] compiling {label} ...", flush=True)
            steps[label] = JaxStep(config, device)
            compile_s[label] = steps[label].compile_s
        flops = {k: s.flops for k, s in steps.items()}
        fns = dict(steps)
        if not args.no_torch:
            print(f"[{name}] building open_clip ...", flush=True)
            fns["open_clip (PyTorch)"] = TorchStep(config, next(iter(steps.values())).params_numpy())
        times = common.alternate(fns, rounds=args.rounds, warmup=1, pause=1.0)
        torch_t = common.median(times["open_clip (PyTorch)"]) if not args.no_torch else None
        # One FLOP count for every row: the shifted variant's, whose depthwise products are explicit
        # multiply-adds. cost_analysis() counts lax's grouped-convolution kernel gradient as a dense one
        # (C times too many), and the matmul form (in CPU "auto") multiplies its matrices' zeros too, so
        # those counts are shown but not used for MFU.
        net_flops = next((flops[k] for k in flops if "shifted" in k), min(flops.values()))
        for label, ts in times.items():
            t = common.median(ts)
            is_jax = label in steps
            peak = peak_jax if is_jax else peak_torch
            rows.append(
                [
                    name,
                    batch,
                    label,
                    common.spread(ts),
                    common.fmt_rate(batch / t),
                    f"{flops.get(label, net_flops) / batch / 1e9:.1f}",
                    f"{100 * net_flops / t / peak:.1f}%",
                    f"{torch_t / t:.2f}x" if torch_t else "-",
                    f"{compile_s[label]:.0f} s" if is_jax else "-",
                ]
            )
            if is_jax and torch_t:
                ratios.append((name, label, torch_t / t))

    headers = ["config", "batch", "step", "step time", "samples/s", "GFLOP/sample", "MFU", "vs open_clip", "compile"]
    body = "\n\n".join(lines) + "\n\n" + common.table(headers, rows)
    body += (
        "\n\nGFLOP/sample is each compiled step's cost_analysis() (forward + backward + AdamW, per "
        "sample); the lax row's count is inflated because XLA counts the grouped convolution's kernel "
        "gradient as a dense convolution, and the auto row's because on CPU its depthwise convolutions of "
        "at most 8x8 positions are matmuls with a [HW, HW] matrix per channel, zeros included. MFU uses "
        "the shifted step's count for every row (its depthwise products are explicit multiply-adds) / "
        "step time / the measured matmul peak of the same "
        "framework. 'vs open_clip' = open_clip step time / ours (>= 1: ours is at least as fast)."
    )
    if backend == "cpu":
        body += (
            "\n\nGPU figures (bf16 MFU, images/s at a batch that fills the GPU, and the paper's 50-epoch "
            "wall time) were NOT measured here: no GPU was available to this run. On a GPU host run "
            "`python bench/train_step.py --configs echoclip --dtype bfloat16 --batch 256 --impls auto "
            "--no_torch` (raise --batch until memory is full); 50 epochs of 922k videos = "
            "46.1M samples / (samples/s)."
        )
    print(body)
    if not args.no_append:
        common.append_section(f"train step: ours vs open_clip ({backend})", body)
    return ratios


if __name__ == "__main__":
    main()
