"""Orbax checkpoints of a training run: train state + per-process grain iterator state, saved together.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`, WORKDIR a local path or a gs:// URL. `state` is the
train-state pytree {step, params, opt_state, rng, bad_step}; `data` holds one `process_<i>-of-<n>.json`
per process. Saves are async. On local disk Orbax writes each step under a temporary name
(`<step>.orbax-checkpoint-tmp`) and renames it when complete; on a bucket (no atomic rename) it writes
`<step>` in place and `commit_success.txt` last. Either way a step half-written when the process died is
never listed. Restoring goes through sharded `jax.ShapeDtypeStruct`s, so a checkpoint loads onto any mesh
or device count.

What a killed save leaves is removed by one party, once: `Checkpointer()` on process 0, before any
process's CheckpointManager exists (`remove_unfinished_saves`); Orbax's own cleanup is switched off:
it runs in a background thread whose error the run's first save raises, and since a step's temporary
name is fixed, the re-save of that step would meet the same debris again, so debris that cannot be
deleted would stop the restarted run. Here such debris is moved aside, logged and ignored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from echoclip_jax.runtime import storage
from echoclip_jax.runtime.distributed import wait_for_other_processes

log = logging.getLogger(__name__)
STATE, DATA = "state", "data"


def checkpoint_dir(workdir: str) -> str:
    """`WORKDIR/checkpoints` (a local path made absolute, a gs:// URL kept)."""
    return storage.join(workdir, "checkpoints")


class Checkpointer:
    """CheckpointManager keeping the last `keep` steps plus the best by `best_metric` (if given).

    One per workdir in a run: its processes meet once, at a barrier named for the workdir, after process 0
    removed what a killed save left and before any of them lists or saves."""

    def __init__(
        self,
        workdir: str,
        *,
        keep: int,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        barrier_timeout_s: float = 600,
    ):
        policies = [cm.LatestN(n=max(int(keep), 1))]
        if best_metric:
            policies.append(
                cm.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        directory = checkpoint_dir(workdir)
        if jax.process_index() == 0:
            remove_unfinished_saves(directory)
        # no process lists or saves before process 0 is done (a no-op with one process)
        wait_for_other_processes(
            f"echoclip_jax.training.checkpoint: unfinished saves removed from {directory}", barrier_timeout_s
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=False,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            directory,
            options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, *, metrics: dict | None = None) -> None:
        """Starts an async save (returns once the arrays are copied off the devices). The iterator's
        state is captured now, so advancing it while the save completes cannot change what is saved."""
        snapshot = _IteratorSnapshot(data_iterator.get_state())
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), DATA: grain.checkpoint.CheckpointSave(snapshot)}
            ),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, abstract_state, data_iterator=None):
        """The state at `step`, placed per the shardings in `abstract_state` (ShapeDtypeStructs); the
        data iterator (if given) is moved to where it was when the step was saved."""
        state = self.manager.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
        )[STATE]
        if data_iterator is not None:
            try:
                self.manager.restore(
                    step, args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(data_iterator)})
                )
            except (FileNotFoundError, ValueError) as e:
                raise FileNotFoundError(
                    f"{self.manager.directory}/{step}/{DATA}: no data-iterator state for process "
                    f"{jax.process_index()} of {jax.process_count()} (was the run saved with another process "
                    f"count?): {e}"
                ) from None
        return state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # in the name of a step (or item) directory Orbax has not finalised
DEBRIS_PREFIX = ".unfinished-"  # an unfinished save moved aside; never a step name, deleted at the next start
COMMIT_FILE = "commit_success.txt"  # on a bucket, what Orbax writes last into a step it finalised


def remove_unfinished_saves(directory: str) -> list[str]:
    """Removes what saves killed midway left in a checkpoints directory; returns the names it found.

    On a bucket, where a rename is a copy and a delete, Orbax writes a step in place and finalises it by
    writing `commit_success.txt` last; it lists only steps that have it. A step folder without it is what a
    killed save left: its objects are deleted one by one. Deleting is not atomic either, but whatever part is
    left still lacks the commit file, so it is never listed or restored and the next start deletes the rest.

    On local disk, each `<step>.orbax-checkpoint-tmp*` is first renamed to a unique hidden
    `.unfinished-<step>.<ns>`: the rename is atomic, so whoever makes it alone deletes that tree, and the
    temporary name the re-save of that step will create is free at once, even where the deletion then fails
    (a file still written or held open by a process of the killed run, an NFS `.nfs*` file).

    A failure is logged, never raised: what is left is ignored by training and retried at the next start."""
    if storage.is_remote(directory):
        return _remove_uncommitted_steps(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(DEBRIS_PREFIX):
            trash = path  # moved aside by an earlier start whose deletion failed or was killed
        elif TMP_SUFFIX in name:
            trash = os.path.join(directory, f"{DEBRIS_PREFIX}{name.replace(TMP_SUFFIX, '')}.{time.time_ns()}")
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError as e:
                log.warning(
                    "%s: could not move an unfinished save aside (%s); delete it by hand once no process "
                    "of the run is alive, or the re-save of that step may fail",
                    path,
                    e,
                )
                continue
        else:
            continue
        found.append(name)
        try:
            shutil.rmtree(trash)
            log.info("removed %s, left by a save that did not finish", path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning(
                "%s: could not delete what an unfinished save left (%s); training ignores it and the "
                "next start retries; delete it by hand once no process of the run is alive",
                trash,
                e,
            )
    return found


def _remove_uncommitted_steps(directory: str) -> list[str]:
    found = []
    for name in storage.listdir(directory):
        step_dir = storage.join(directory, name)
        if not name.isdigit() or storage.exists(storage.join(step_dir, COMMIT_FILE)):
            continue
        found.append(name)
        try:
            storage.rmtree(step_dir)
            log.info("removed %s, left by a save that did not finish (no %s)", step_dir, COMMIT_FILE)
        except OSError as e:
            log.warning(
                "%s: could not delete what an unfinished save left (%s); it is never restored (it has no "
                "%s), and the next start retries",
                step_dir,
                e,
                COMMIT_FILE,
            )
    return found


class _IteratorSnapshot:
    """A grain iterator state frozen at save time, in the form grain's checkpoint handler writes."""

    def __init__(self, state):
        self._json = json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._json


def _read_only(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def _resolve(path: str) -> str:
    """The checkpoints directory for a workdir or a checkpoints directory."""
    return checkpoint_dir(path) if storage.isdir(storage.join(path, "checkpoints")) else storage.join(path)


def all_steps(workdir: str) -> list[int]:
    """Completed checkpoint steps of a workdir (or checkpoints directory), ascending."""
    d = _resolve(workdir)
    if not storage.isdir(d):
        return []
    return sorted(_read_only(d).all_steps())


def latest_step(workdir: str) -> int | None:
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def restore_params(workdir_or_checkpoint: str, step: int | None = None):
    """Model parameters only (nested dict of numpy arrays, as `nnx.to_pure_dict` gives; pass to
    `nnx.update(model, params)`), from a workdir, its checkpoints directory or one step directory (each a
    local path or a gs:// URL)."""
    path = storage.join(workdir_or_checkpoint)
    if storage.isdir(storage.join(path, STATE)):  # a step directory
        name = storage.path(path).name
        if step is not None and name != str(step):
            raise ValueError(f"{path}: is the checkpoint of step {name}, not {step}")
        state_dir = storage.join(path, STATE)
    else:
        steps = all_steps(path)
        if not steps:
            raise FileNotFoundError(f"{path}: no completed checkpoint found")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{path}: no checkpoint for step {step}; have {steps}")
        state_dir = storage.join(_resolve(path), str(step), STATE)
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(state_dir).item_metadata
    tree = meta.tree if hasattr(meta, "tree") else meta
    if "params" not in tree:
        raise ValueError(f"{state_dir}: not a training-state checkpoint (no 'params')")
    item = {"params": tree["params"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )
    return _int_keys(out["params"])


def _int_keys(tree):
    """Orbax stores dict keys as strings; nnx.to_pure_dict numbers list-like layers with ints."""
    if isinstance(tree, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}
    return tree


class Preemption:
    """SIGTERM (preemption notice) sets a flag; the train loop saves at the next step and exits 0."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: will save a checkpoint at the next step and exit")
        self.requested = True

    def agreed(self) -> bool:
        """True when any process got SIGTERM (all processes must save the same step together)."""
        if jax.process_count() == 1:
            return self.requested

        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.any(flags))

    def restore_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
