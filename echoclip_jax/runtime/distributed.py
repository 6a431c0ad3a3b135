"""Several processes as one job: jax.distributed set-up, a barrier, and the error a lost peer raises."""
from __future__ import annotations

import logging
import os

import jax
from jax._src import distributed  # the client has no public handle in this JAX version

log = logging.getLogger("echoclip_jax.train")


def init_distributed(dc) -> None:
    """jax.distributed across hosts: explicit coordinator flags, or auto-detected (SLURM, TPU pod).
    When a process dies, the others abort ("...another task died") within dc.heartbeat_timeout seconds."""
    timeouts = dict(initialization_timeout=int(dc.initialization_timeout),
                    heartbeat_timeout_seconds=int(dc.heartbeat_timeout))
    if dc.coordinator_address:
        jax.distributed.initialize(coordinator_address=dc.coordinator_address,
                                   num_processes=int(dc.num_processes) or None,
                                   process_id=int(dc.process_id) if dc.process_id >= 0 else None, **timeouts)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize(**timeouts)
    else:
        return
    log.info("process %d of %d; a process that stops responding for %d s aborts the others",
             jax.process_index(), jax.process_count(), timeouts["heartbeat_timeout_seconds"])


def wait_for_other_processes(name: str, timeout_s: float) -> None:
    """A barrier through jax.distributed's coordination service (not a collective), for multi-process runs.

    Gloo (the CPU collectives) sets a communicator up at a program's first collective and gives up when the
    other processes have not joined within 30 s: processes that compiled at different speeds meet here first."""

    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


class PeerLostError(RuntimeError):
    """A collective with the other processes of a multi-process run failed: one of them most likely died."""
