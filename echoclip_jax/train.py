"""Train a CLIP on data_prep's TFRecords, on one CPU or a pod: `python -m echoclip_jax.train
--config configs/tiny.py --workdir W [--config.total_steps=100 ...]`. Resumes from W when it holds a
checkpoint.

Reads top to bottom: distributed init, mesh, input, model, shardings, update step, checkpoint,
evaluation, loop. The train state is a plain pytree {step, params, opt_state, rng, bad_step}; the
model is rebuilt from its graphdef inside the jitted step (nnx.merge), so jit shardings, Orbax and
weight conversion see plain nested dicts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from echoclip_jax.training import checkpoint as ckpt_lib
from echoclip_jax.runtime.distributed import PeerLostError, init_distributed, wait_for_other_processes
from echoclip_jax.data import loader as data
from echoclip_jax.training import losses
from echoclip_jax import models
from echoclip_jax.training import optim
from echoclip_jax.runtime import sharding
from echoclip_jax.weights import loader as weights
from echoclip_jax.evaluation import metrics as metrics_lib
from echoclip_jax.config.validation import ConfigError, validate
from echoclip_jax.models import backend

log = logging.getLogger("echoclip_jax.train")

# Peak dense bf16 FLOP/s per device, for MFU; unknown kinds (e.g. CPU) report MFU as null.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
              "NVIDIA RTX A6000": 155e12}


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and cost.get("flops") else None


def initial_params(config, abstract_params, param_sh):
    """Random (seeded), an imported open_clip state dict, or the weights of one of our checkpoints (a training
    workdir, `W@STEP`, or a params-only export), read by `weights.load` under its config rule."""
    kind = config.init.kind
    if kind == "random":
        def init():
            return nnx.to_pure_dict(nnx.state(models.build_model(config.model, rngs=nnx.Rngs(config.seed)), nnx.Param))
        return jax.jit(init, out_shardings=param_sh)()
    if kind in ("checkpoint", "open_clip"):
        spec = (weights.parse(f"orbax:{config.init.path}") if kind == "checkpoint"  # a workdir may name W@STEP
                else weights.Spec("open_clip", config.init.path))
        _, flat = weights.load(spec, config.model)
        loaded = weights.nested(flat)
    else:
        raise ValueError(f"init.kind {kind!r}: expected random, open_clip or checkpoint")
    want = jax.tree.structure(abstract_params)
    if jax.tree.structure(loaded) != want:
        raise ValueError(f"init.path {config.init.path}: parameter tree does not match config.model")
    for (path, a), b in zip(jax.tree.leaves_with_path(abstract_params), jax.tree.leaves(loaded)):
        if tuple(a.shape) != tuple(np.shape(b)):
            raise ValueError(f"init.path {config.init.path}: {jax.tree_util.keystr(path)} has shape "
                             f"{np.shape(b)}, config.model wants {a.shape}")
    return jax.device_put(jax.tree.map(lambda a, b: np.asarray(b, a.dtype), abstract_params, loaded), param_sh)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted update step and what surrounds it; train() and bench/ use the same one.

    `step(state, batch) -> (state, metrics)` donates `state`; `init_state(params)` builds a fresh train
    state; `embed(params, batch) -> (img, txt)` runs the eval-mode towers. `abs_state` carries the
    shardings (for Orbax restore and for `step.lower(...)` without allocating).
    """
    step: Callable
    init_state: Callable
    embed: Callable
    abs_params: dict
    abs_state: dict
    param_sh: Any
    state_sh: Any
    batch_sh: dict
    schedule: Callable


def build_train_step(config, mesh, total_steps: int) -> TrainStep:
    """Model (abstract: nothing allocated), shardings, optimiser and the jitted update step for `mesh`."""
    rules = sharding.get_rules(config.sharding_preset)
    abstract = nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(config.seed)))
    abstract.train()
    train_graph, abs_param_state, abs_rest_state = nnx.split(abstract, nnx.Param, ...)
    abstract.eval()
    eval_graph = nnx.split(abstract, nnx.Param, ...)[0]
    abs_params = nnx.to_pure_dict(abs_param_state)
    abs_rest = nnx.to_pure_dict(abs_rest_state)

    param_sh = sharding.param_shardings(abs_param_state, mesh, rules)
    tx, schedule = optim.make_optimizer(config.optim, total_steps, abs_params)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    repl = sharding.replicated(mesh)
    state_sh = {"step": repl, "params": param_sh, "opt_state": sharding.like_params(abs_opt, abs_params, param_sh, mesh),
                "rng": repl, "bad_step": repl}
    loss_fn = losses.make_loss_fn(config.loss, mesh)
    max_ls = float(config.loss.max_logit_scale)
    accum = int(config.optim.grad_accum_steps)
    stop_on_nan = config.optim.nan_policy == "stop"

    def fresh_rest(rng):
        """The model's non-parameter state (dropout / drop-path RNG streams), derived from the step RNG."""
        leaves, tree = jax.tree.flatten(abs_rest)
        out = [jax.random.fold_in(rng, i) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
               else jnp.zeros(x.shape, x.dtype) for i, x in enumerate(leaves)]
        return jax.tree.unflatten(tree, out)

    def forward(graph, params, rest, batch):
        model = nnx.merge(graph, params, rest)
        images = models.preprocess_images(batch["images"])
        img, txt = model(images, batch["tokens"])
        bias = model.logit_bias[...] if model.logit_bias is not None else None
        return img, txt, model.logit_scale[...], bias

    # the update step: a pure function of (state, batch)
    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        rest = fresh_rest(rng)

        def loss_and_grad(params, mb):
            def f(p):
                img, txt, ls, bias = forward(train_graph, p, rest, mb)
                return loss_fn(img, txt, ls, bias), {}
            return jax.value_and_grad(f, has_aux=True)(params)

        (loss, _), grads = optim.accumulate_gradients(loss_and_grad, state["params"], batch, accum)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & (state["bad_step"] < 0) if stop_on_nan else finite
        # apply=False: zero updates and an unchanged optimizer state (optim.adamw), with no select over the state
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"], apply=apply)
        params = optax.apply_updates(state["params"], updates)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, max_ls)  # as open_clip, after each step
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
            "rng": state["rng"],
            "bad_step": jnp.where(~finite & (state["bad_step"] < 0), state["step"], state["bad_step"]),
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "logit_scale": jnp.exp(new_state["params"]["logit_scale"]), "skipped": 1 - apply.astype(jnp.int32)}
        return new_state, metrics

    batch_sh = {"images": sharding.batch_sharding(mesh, 5 if config.data.frames_per_sample > 1 else 4),
                "tokens": sharding.batch_sharding(mesh, 2)}
    # traced for the mesh's platform, not this host's default backend (they differ in echoclip_jax.aot)
    p_train_step = jax.jit(backend.for_mesh(mesh, train_step), in_shardings=(state_sh, batch_sh),
                           out_shardings=(state_sh, repl), donate_argnums=0)

    def embed(params, batch):
        img, txt, _, _ = forward(eval_graph, params, fresh_rest(jax.random.key(0)), batch)
        return img, txt

    p_embed = jax.jit(backend.for_mesh(mesh, embed), in_shardings=(param_sh, batch_sh), out_shardings=repl)
    init_state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p),
                                    "rng": jax.random.key_data(jax.random.key(config.seed)),
                                    "bad_step": jnp.full((), -1, jnp.int32)},
                         in_shardings=(param_sh,), out_shardings=state_sh)
    abs_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abs_params, "opt_state": abs_opt,
                 "rng": jax.ShapeDtypeStruct((2,), jnp.uint32), "bad_step": jax.ShapeDtypeStruct((), jnp.int32)}
    abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, state_sh)
    return TrainStep(step=p_train_step, init_state=init_state, embed=p_embed, abs_params=abs_params,
                     abs_state=abs_state, param_sh=param_sh, state_sh=state_sh, batch_sh=batch_sh, schedule=schedule)


def restore_or_init(config, ts: TrainStep, checkpointer, iterator) -> tuple[dict, int]:
    """(state, step): the latest checkpoint of the workdir with the data position it saved, or a fresh
    state from `config.init` at step 0."""
    start = checkpointer.latest_step()
    if start is not None:
        state = checkpointer.restore(start, ts.abs_state, iterator)
        log.info("resumed from %s at step %d", checkpointer.manager.directory, start)
        return state, start
    return ts.init_state(initial_params(config, ts.abs_params, ts.param_sh)), 0


def validation_metrics(params, batches, embed, loss_fn, num_records: int) -> dict:
    """Validation loss and retrieval recall (`metrics.retrieval_metrics`) over `batches` of the eval split;
    a split smaller than the batches wraps round, so only its first `num_records` pairs count."""
    imgs, txts = [], []
    for batch in batches:
        i, t = embed(params, batch)
        imgs.append(np.asarray(i))
        txts.append(np.asarray(t))
    img, txt = np.concatenate(imgs)[:num_records], np.concatenate(txts)[:num_records]
    bias = float(np.asarray(params["logit_bias"])) if "logit_bias" in params else None
    out = {"val/loss": float(loss_fn(jnp.asarray(img), jnp.asarray(txt), float(np.asarray(params["logit_scale"])),
                                     bias))}
    retrieval = metrics_lib.retrieval_metrics(img, txt)
    for name, key in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
        for k in (1, 5):
            out[f"val/{name}_recall_at_{k}"] = retrieval[key][f"recall@{k}"]
    out["val/recall_at_1"] = 0.5 * (out["val/i2t_recall_at_1"] + out["val/t2i_recall_at_1"])
    return out


@dataclasses.dataclass(frozen=True)
class Due:
    """What a finished step calls for: a metrics row (`log`), a checkpoint (`save`), an evaluation."""
    log: bool
    save: bool
    eval: bool


def due(config, step: int, total: int) -> Due:
    last = step == total
    return Due(log=step % config.log_every_steps == 0 or last,
               save=step % config.checkpoint_every_steps == 0 or last,
               eval=config.eval_batches > 0 and (bool(config.eval_every_steps and step % config.eval_every_steps == 0)
                                                 or last))


def metrics_row(step_metrics, *, seconds_per_step: float, batch_size: int, flops, peak, corrupt_skipped: int) -> dict:
    """One metrics.jsonl row: the step's metrics, its speed, MFU where the chip's peak is known."""
    m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    m.update(step_time=seconds_per_step, samples_per_s=batch_size / seconds_per_step,
             corrupt_records_skipped=corrupt_skipped,
             mfu=(flops / seconds_per_step / peak) if flops and peak else None,
             tflops_per_device=(flops / seconds_per_step / 1e12) if flops else None)
    return m


def _check_finite(state, checkpointer) -> None:
    bad = int(state["bad_step"])
    if bad >= 0:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {bad}; stopping without applying it or saving a checkpoint "
            f"(latest good checkpoint: step {checkpointer.latest_step()}). Set --config.optim.nan_policy=skip "
            f"to skip such steps instead.")


def train(config, workdir: str, *, devices=None) -> dict:
    """Runs (or resumes) training; returns the last logged metrics. `devices` restricts the mesh."""
    os.makedirs(workdir, exist_ok=True)
    init_distributed(config.distributed)
    validate(config, num_devices=len(devices) if devices is not None else None)
    total = int(config.total_steps)

    # ---- mesh and input
    mesh = sharding.build_mesh(config.mesh, devices)
    train_data = data.train_loader(config, mesh)
    evaluating = config.eval_batches > 0
    eval_records = len(data.ShardedRecords(config.data_dir, config.data.eval_split)) if evaluating else 0

    # ---- model, shardings, optimiser and the jitted update step (shared with bench/ and aot)
    ts = build_train_step(config, mesh, total)
    p_copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), in_shardings=(ts.state_sh,), out_shardings=ts.state_sh)
    eval_loss_config = config.loss.copy_and_resolve_references()
    eval_loss_config.impl = "plain"  # the gathered eval embeddings are on the host
    eval_loss = losses.make_loss_fn(eval_loss_config)

    # ---- checkpoint: resume, or initialise
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                         best_metric="val/recall_at_1" if evaluating else None)
    t_init = time.perf_counter()
    state, start = restore_or_init(config, ts, checkpointer, train_data.iterator)
    log.info("state ready in %.1f s", time.perf_counter() - t_init)

    # ---- loop
    metrics_log = MetricsLog(workdir)
    preemption = ckpt_lib.Preemption()
    batch = next(train_data) if start < total else None
    t_compile = time.perf_counter()
    flops = _flops(ts.step.lower(state, batch).compile()) if batch is not None else None
    log.info("train step compiled in %.1f s (%s FLOPs per device per step)", time.perf_counter() - t_compile, flops)
    multi = jax.process_count() > 1
    if multi:
        wait_for_other_processes("echoclip_jax.train: step compiled", config.distributed.initialization_timeout)
    peak = PEAK_FLOPS.get(next((k for k in PEAK_FLOPS if jax.devices()[0].device_kind.startswith(k)), ""))
    last, t0, t_steps = {}, time.perf_counter(), 0
    step = start
    try:
        while step < total:
            state, step_metrics = ts.step(state, batch)
            step += 1
            t_steps += 1
            now = due(config, step, total)
            preempted = preemption.agreed() if (now.log or not multi) else False
            if config.optim.nan_policy == "stop" and (now.log or now.save or now.eval or preempted):
                _check_finite(state, checkpointer)
            eval_metrics = None
            if now.log or now.eval:  # one metrics.jsonl row per logged step, eval metrics in it
                m = metrics_row(step_metrics, seconds_per_step=(time.perf_counter() - t0) / t_steps,
                                batch_size=config.batch_size, flops=flops, peak=peak,
                                corrupt_skipped=train_data.corrupt_skipped)
                log.info("step %d/%d loss %.4f lr %.3g logit_scale %.2f %.1f samples/s", step, total, m["loss"],
                         m["lr"], m["logit_scale"], m["samples_per_s"])
                if now.eval:
                    eval_metrics = validation_metrics(state["params"], data.eval_loader(config, mesh), ts.embed,
                                                      eval_loss, min(config.eval_batches * config.batch_size,
                                                                     eval_records))
                    m.update(eval_metrics)
                    log.info("step %d eval: %s", step, eval_metrics)
                metrics_log.write(step, m)
                last, t0, t_steps = m, time.perf_counter(), 0
            if now.save or preempted:
                # the async save reads its arrays in the background while the next step donates (frees)
                # the state's buffers, so it gets its own copy
                checkpointer.save(step, p_copy(state), train_data.iterator, metrics=eval_metrics)
                if jax.default_backend() == "cpu":
                    # XLA:CPU's in-process collectives abort when a rendezvous stalls; the background save
                    # competing for the host's cores can stall one. On CPU the "device" is the host anyway.
                    checkpointer.wait()
            if preempted:
                log.warning("preempted: saved step %d, exiting", step)
                break
            if step < total:
                batch = next(train_data)
    except jax.errors.JaxRuntimeError as e:
        if not multi:
            raise
        # said at once: the distributed service may abort this process before the exception unwinds
        msg = (f"process {jax.process_index()} of {jax.process_count()}: a collective with the other processes "
               f"failed after step {step} ({str(e).splitlines()[0]}); another process most likely died. Stopping "
               f"without saving; restart every process to resume from the latest checkpoint (step "
               f"{checkpointer.latest_step()}).")
        log.error(msg)
        raise PeerLostError(msg) from None
    finally:
        checkpointer.wait()
        checkpointer.close()
        metrics_log.close()
        preemption.restore_handler()
    return last


def main(argv) -> None:
    del argv
    from absl import flags

    from echoclip_jax.runtime import logs

    logs.setup()
    FLAGS = flags.FLAGS
    try:
        train(FLAGS.config, FLAGS.workdir)
    except (FloatingPointError, ConfigError) as e:
        sys.exit(f"echoclip_jax.train: {e}")
    except PeerLostError as e:
        # exit now: at a normal exit jax.distributed's shutdown barrier would wait for the dead process until
        # the heartbeat timeout, then abort
        print(f"echoclip_jax.train: {e}", file=sys.stderr, flush=True)
        os._exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, TensorBoard; resumes from it")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
