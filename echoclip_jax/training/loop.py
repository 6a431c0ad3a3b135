"""Training, top to bottom: distributed init, mesh, input, the train step, checkpoint (resume or
initialise), then the loop with its logging, evaluation, saves and preemption.

The train state is a plain pytree {step, params, opt_state, rng, bad_step} (`echoclip_jax.training.step`).
Process 0 writes `metrics.jsonl` (one JSON line per logged step: loss, learning rate, speed, MFU where the
chip's peak is known, and the validation figures when evaluated) and TensorBoard scalars. A non-finite loss
or gradient stops the run before it is applied or saved (or skips the step with `optim.nan_policy=skip`);
a lost peer of a multi-process run stops every process with `PeerLostError`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter

from echoclip_jax.config.validation import validate
from echoclip_jax.data import loader as data
from echoclip_jax.evaluation import metrics as metrics_lib
from echoclip_jax.models import backend
from echoclip_jax.runtime import sharding, storage
from echoclip_jax.runtime.distributed import PeerLostError, init_distributed, wait_for_other_processes
from echoclip_jax.training import checkpoint as ckpt_lib
from echoclip_jax.training import losses
from echoclip_jax.training.step import TrainStep, build_train_step, compiled_flops, initial_params

log = logging.getLogger(__name__)
# Peak dense bf16 FLOP/s per device, for MFU; unknown kinds (e.g. CPU) report MFU as null.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA RTX A6000": 155e12,
}


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by process 0 only.

    On local disk both are flushed at every row. In a bucket an object cannot be appended to, so each flush
    rewrites the file whole: metrics.jsonl through `storage.JsonLines`, and the events file, which is written
    to a local folder and uploaded (tensorboardX's own GCS writer uploads once more when it is garbage
    collected, and waits minutes at exit when the bucket is unreachable). Both are flushed at most every
    `remote_flush_s` seconds, when the run ends and before a preemption exit: a run killed without warning
    loses at most that many seconds of rows (its checkpoints are unaffected)."""

    def __init__(self, workdir: str, *, remote_flush_s: float = 30.0):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.remote = storage.is_remote(workdir)
        self.flush_s = remote_flush_s if self.remote else 0.0
        self.jsonl = storage.JsonLines(storage.join(workdir, "metrics.jsonl"), flush_every_s=self.flush_s)
        self.tb_dir = storage.join(workdir, "tensorboard")
        self._staging = tempfile.TemporaryDirectory(prefix="echoclip_jax-tb-") if self.remote else None
        self.tb = SummaryWriter(self._staging.name if self.remote else self.tb_dir, flush_secs=3600)
        self._tb_flushed = float("-inf")  # the first row is written at once

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {
            "step": step,
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
        }
        self.jsonl.write(row)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if time.monotonic() - self._tb_flushed >= self.flush_s:
            self._flush_tb()

    def _flush_tb(self) -> None:
        self.tb.flush()
        if self.remote:  # this run's events file(s), whole; earlier runs' files in the bucket stay as they are
            storage.copytree(self._staging.name, self.tb_dir)
        self._tb_flushed = time.monotonic()

    def flush(self) -> None:
        """Everything written so far, to the workdir now (called before a preemption exit)."""
        if self.active:
            self.jsonl.flush(force=True)
            self._flush_tb()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()
            if self.remote:
                storage.copytree(self._staging.name, self.tb_dir)
                self._staging.cleanup()


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
    out = {
        "val/loss": float(loss_fn(jnp.asarray(img), jnp.asarray(txt), float(np.asarray(params["logit_scale"])), bias))
    }
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
    return Due(
        log=step % config.log_every_steps == 0 or last,
        save=step % config.checkpoint_every_steps == 0 or last,
        eval=config.eval_batches > 0
        and (bool(config.eval_every_steps and step % config.eval_every_steps == 0) or last),
    )


def metrics_row(step_metrics, *, seconds_per_step: float, batch_size: int, flops, peak, corrupt_skipped: int) -> dict:
    """One metrics.jsonl row: the step's metrics, its speed, MFU where the chip's peak is known."""
    m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    m.update(
        step_time=seconds_per_step,
        samples_per_s=batch_size / seconds_per_step,
        corrupt_records_skipped=corrupt_skipped,
        mfu=(flops / seconds_per_step / peak) if flops and peak else None,
        tflops_per_device=(flops / seconds_per_step / 1e12) if flops else None,
    )
    return m


def _check_finite(state, checkpointer) -> None:
    bad = int(state["bad_step"])
    if bad >= 0:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {bad}; stopping without applying it or saving a checkpoint "
            f"(latest good checkpoint: step {checkpointer.latest_step()}). Set --config.optim.nan_policy=skip "
            f"to skip such steps instead."
        )


def train(config, workdir: str, *, devices=None) -> dict:
    """Runs (or resumes) training; returns the last logged metrics. `devices` restricts the mesh."""
    storage.makedirs(workdir)
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
    checkpointer = ckpt_lib.Checkpointer(
        workdir, keep=config.keep_checkpoints, best_metric="val/recall_at_1" if evaluating else None
    )
    t_init = time.perf_counter()
    state, start = restore_or_init(config, ts, checkpointer, train_data.iterator)
    log.info("state ready in %.1f s", time.perf_counter() - t_init)

    # ---- loop
    metrics_log = MetricsLog(workdir)
    preemption = ckpt_lib.Preemption()
    batch = next(train_data) if start < total else None
    t_compile = time.perf_counter()
    flops = compiled_flops(ts.step.lower(state, batch).compile()) if batch is not None else None
    log.info("train step compiled in %.1f s (%s FLOPs per device per step)", time.perf_counter() - t_compile, flops)
    multi = jax.process_count() > 1
    on_cpu = backend.mesh_platform(mesh) == "cpu"  # the platform the step runs on (models.backend's rule)
    if multi:
        wait_for_other_processes(
            f"echoclip_jax.train: step compiled ({storage.join(workdir)})", config.distributed.initialization_timeout
        )
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
                m = metrics_row(
                    step_metrics,
                    seconds_per_step=(time.perf_counter() - t0) / t_steps,
                    batch_size=config.batch_size,
                    flops=flops,
                    peak=peak,
                    corrupt_skipped=train_data.corrupt_skipped,
                )
                log.info(
                    "step %d/%d loss %.4f lr %.3g logit_scale %.2f %.1f samples/s",
                    step,
                    total,
                    m["loss"],
                    m["lr"],
                    m["logit_scale"],
                    m["samples_per_s"],
                )
                if now.eval:
                    eval_metrics = validation_metrics(
                        state["params"],
                        data.eval_loader(config, mesh),
                        ts.embed,
                        eval_loss,
                        min(config.eval_batches * config.batch_size, eval_records),
                    )
                    m.update(eval_metrics)
                    log.info("step %d eval: %s", step, eval_metrics)
                metrics_log.write(step, m)
                last, t0, t_steps = m, time.perf_counter(), 0
            if now.save or preempted:
                # the async save reads its arrays in the background while the next step donates (frees)
                # the state's buffers, so it gets its own copy
                checkpointer.save(step, p_copy(state), train_data.iterator, metrics=eval_metrics)
                if on_cpu:
                    # XLA:CPU's in-process collectives abort when a rendezvous stalls; the background save
                    # competing for the host's cores can stall one. On CPU the "device" is the host anyway.
                    checkpointer.wait()
            if preempted:
                metrics_log.flush()
                log.warning("preempted: saved step %d, exiting", step)
                break
            if step < total:
                batch = next(train_data)
    except jax.errors.JaxRuntimeError as e:
        if not multi:
            raise
        # said at once: the distributed service may abort this process before the exception unwinds
        msg = (
            f"process {jax.process_index()} of {jax.process_count()}: a collective with the other processes "
            f"failed after step {step} ({str(e).splitlines()[0]}); another process most likely died. Stopping "
            f"without saving; restart every process to resume from the latest checkpoint (step "
            f"{checkpointer.latest_step()})."
        )
        log.error(msg)
        raise PeerLostError(msg) from None
    finally:
        checkpointer.wait()
        checkpointer.close()
        metrics_log.close()
        preemption.restore_handler()
    return last
