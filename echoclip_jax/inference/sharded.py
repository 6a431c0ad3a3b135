"""A model's weights on every local device, and its jitted functions run over fixed-size sharded batches.

The one inference helper: embedding (`echoclip_jax.inference.embedder`) and saliency maps (`echoclip_jax.interpret`)
both hold a `ShardedModel`. Its mesh is `sharding.build_mesh` with every local device on the data axis;
the weights are replicated, a batch is split over the devices, and every call pads its last batch to the
one fixed size, so no input length triggers a new compilation.
"""

from __future__ import annotations

from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from echoclip_jax.runtime import sharding


class ShardedModel:
    """`model` (an nnx.Module, put in eval mode) split into its graph and a device-replicated state.

    `batch_size` is rounded up to a multiple of the device count. Functions passed to `map_batches` take
    `(state, batch, *args)`; `module(state)` rebuilds the model inside them.
    """

    def __init__(self, model, *, batch_size: int, devices=None):
        model.eval()
        self.graphdef, state = nnx.split(model)
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = sharding.build_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}), devices)
        self.batch_sharding = NamedSharding(self.mesh, P(sharding.BATCH_AXES))
        self.replicated = NamedSharding(self.mesh, P())
        self.state = jax.device_put(state, self.replicated)
        n = len(devices)
        self.num_devices = n
        self.batch_size = max(n, -(-int(batch_size) // n) * n)

    def module(self, state):
        """The model with `state` (inside a jitted function)."""
        return nnx.merge(self.graphdef, state)

    def put(self, x: np.ndarray):
        """A host array split over the devices along its first axis (its length a multiple of the devices)."""
        return jax.device_put(x, self.batch_sharding)

    def replicate(self, x):
        return jax.device_put(x, self.replicated)

    def map_batches(
        self,
        fn: Callable,
        x: np.ndarray,
        *args,
        batch: int | None = None,
        out_axis: int = 0,
        per_batch: Callable[[], tuple] | None = None,
    ):
        """fn(state, batch, *args, *per_batch()) over x in batches of `batch` rows (default `batch_size`);
        the last batch is padded with zeros and its padding dropped from every output (a pytree of arrays
        whose axis `out_axis` is the batch). All batches are dispatched before the first result is read,
        so transfers overlap the computation. None when x is empty."""
        batch = self.batch_size if batch is None else batch
        pending = []
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            keep = len(chunk)
            if keep < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - keep, *chunk.shape[1:]), chunk.dtype)])
            extra = per_batch() if per_batch is not None else ()
            pending.append((fn(self.state, self.put(chunk), *args, *extra), keep))
        if not pending:
            return None
        host = [
            jax.tree.map(lambda a, k=keep: np.take(np.asarray(a), np.arange(k), axis=out_axis), out)
            for out, keep in pending
        ]
        return jax.tree.map(lambda *parts: np.concatenate(parts, axis=out_axis), *host)
