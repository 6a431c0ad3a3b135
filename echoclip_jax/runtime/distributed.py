"""Several processes as one job: jax.distributed set-up, a barrier, and the error a lost peer raises."""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def init_distributed(dc) -> None:
    """jax.distributed across hosts: explicit coordinator flags, or auto-detected (SLURM, TPU pod).
    When a process dies, the others abort ("...another task died") within dc.heartbeat_timeout seconds."""
    timeouts = dict(
        initialization_timeout=int(dc.initialization_timeout), heartbeat_timeout_seconds=int(dc.heartbeat_timeout)
    )
    if dc.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=dc.coordinator_address,
            num_processes=int(dc.num_processes) or None,
            process_id=int(dc.process_id) if dc.process_id >= 0 else None,
            **timeouts,
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize(**timeouts)
    else:
        return
    log.info(
        "process %d of %d; a process that stops responding for %d s aborts the others",
        jax.process_index(),
        jax.process_count(),
        timeouts["heartbeat_timeout_seconds"],
    )


def wait_for_other_processes(name: str, timeout_s: float) -> None:
    """A barrier through jax.distributed's coordination service (not a collective; a no-op with one process).

    `name` names the point every process reaches, once per run: the service wants a key used once, and a key
    made of what the processes do (never a count kept by one of them) stays the same on every process. A
    collective would not do: Gloo (the CPU collectives) sets a communicator up at a program's first
    collective and gives up when the other processes have not joined within 30 s, and processes that
    compiled at different speeds meet here first. A process that does not arrive within `timeout_s` fails
    the barrier on the others, naming the missing tasks."""
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


class PeerLostError(RuntimeError):
    """A collective with the other processes of a multi-process run failed: one of them most likely died."""
