"""The attentive probe: a learned query attends over a video's (or a study's) frame embeddings, then a
linear head; trained with optax AdamW on frozen embeddings.

A linear probe on the mean-pooled video embedding sees every frame diluted by all the others; when the
label lives in a few frames (a device visible in some of the cardiac cycle, one view among a study's
videos), attention can pick those frames out. This is the attentive probe of the newer echo foundation
models' evaluations (EchoJEPA, PanEcho), kept small: one multi-head query, the standardised frames as
values, a linear head; a fixed number of epochs from a fixed seed (no early stopping, so a run is
reproducible and needs no held-out data).

Items have different numbers of frames: a batch is padded with a mask to a bucket length (a power of two,
at least 8: `echoclip_jax.inference.embedder.bucket`) and the batch size is fixed (short batches are padded with
rows of zero weight), so training compiles once per bucket, not once per length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from echoclip_jax.inference.embedder import bucket

DEFAULTS = dict(heads=4, key_dim=16, epochs=60, batch_size=32, lr=3e-3, weight_decay=1e-2, seed=0)


def _module(dim: int, n_out: int, heads: int, key_dim: int, seed: int):
    """The probe's Flax NNX module (built lazily so importing this file does not import JAX)."""

    class AttentiveProbe(nnx.Module):
        """frames [B, T, D] + mask [B, T] -> outputs [B, n_out]: per head, a learned query scores every
        frame's key projection; the masked softmax weights pool the frames; the pooled frames of all heads,
        concatenated, go through one linear layer."""

        def __init__(self, rngs: nnx.Rngs):
            self.key = nnx.Linear(dim, heads * key_dim, use_bias=False, rngs=rngs)
            self.query = nnx.Param(nnx.initializers.normal(key_dim**-0.5)(rngs.params(), (heads, key_dim)))
            self.head = nnx.Linear(heads * dim, n_out, rngs=rngs)

        def attention(self, frames, mask):
            k = self.key(frames).reshape(*frames.shape[:2], heads, key_dim)
            scores = jnp.einsum("hk,bthk->bht", self.query[...], k) * key_dim**-0.5
            scores = jnp.where(mask[:, None, :], scores, -jnp.inf)
            return jax.nn.softmax(scores, axis=-1)  # [B, heads, T]

        def __call__(self, frames, mask):
            pooled = jnp.einsum("bht,btd->bhd", self.attention(frames, mask), frames)
            return self.head(pooled.reshape(len(frames), -1))

    return AttentiveProbe(nnx.Rngs(seed))


@dataclasses.dataclass
class Fitted:
    """A trained attentive probe and what it needs to predict: the training frames' per-dimension mean and
    standard deviation, the regression target's scale, the classes."""

    graphdef: object
    state: object
    mean: np.ndarray
    std: np.ndarray
    task: str
    classes: np.ndarray | None
    y_mean: float
    y_std: float
    hyperparameters: dict
    losses: list  # mean training loss per epoch


def _batches(items: list[np.ndarray], order: np.ndarray, batch_size: int, mean, std):
    """(index rows [B] with -1 for padding rows, frames [B, T, D], mask [B, T]) per batch of `order`;
    T is the bucket of the batch's longest item."""
    dim = len(mean)
    for first in range(0, len(order), batch_size):
        idx = order[first : first + batch_size]
        t = bucket(max(len(items[i]) for i in idx))
        frames = np.zeros((batch_size, t, dim), np.float32)
        mask = np.zeros((batch_size, t), bool)
        mask[:, 0] = True  # padding rows attend to one zero frame, never an empty softmax
        rows = np.full(batch_size, -1)
        for r, i in enumerate(idx):
            frames[r, : len(items[i])] = (items[i] - mean) / std
            mask[r, : len(items[i])] = True
            rows[r] = i
        yield rows, frames, mask


def fit(items: list[np.ndarray], y: np.ndarray, task: str, **hyperparameters) -> Fitted:
    """Trains the probe on `items` (one [T_i, D] array of frame embeddings per video or study, T_i >= 1)
    with targets `y` (class labels for task "classification", numbers for "regression"). Hyperparameters
    (DEFAULTS): heads, key_dim, epochs, batch_size, lr, weight_decay, seed."""

    hp = {**DEFAULTS, **hyperparameters}
    if not items:
        raise ValueError("the attentive probe needs at least one training item")
    stacked = np.concatenate(items).astype(np.float64)
    mean, std = stacked.mean(0), stacked.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    if task == "classification":
        classes, target = np.unique(np.asarray(y), return_inverse=True)
        n_out, y_mean, y_std = len(classes), 0.0, 1.0
        target = target.astype(np.int32)
    else:
        classes, y = None, np.asarray(y, np.float64)
        y_mean, y_std = float(y.mean()), float(y.std()) or 1.0
        target, n_out = ((y - y_mean) / y_std).astype(np.float32), 1
    batch_size = int(min(hp["batch_size"], len(items)))
    model = _module(len(mean), n_out, hp["heads"], hp["key_dim"], hp["seed"])
    graphdef, params = nnx.split(model)
    tx = optax.adamw(hp["lr"], weight_decay=hp["weight_decay"])
    opt_state = tx.init(params)

    def loss_fn(params, frames, mask, target, weight):
        out = nnx.merge(graphdef, params)(frames, mask)
        if task == "classification":
            per = optax.softmax_cross_entropy_with_integer_labels(out, target)
        else:
            per = jnp.square(out[:, 0] - target)
        return jnp.sum(per * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    @jax.jit
    def step(params, opt_state, frames, mask, target, weight):
        loss, grads = jax.value_and_grad(loss_fn)(params, frames, mask, target, weight)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(hp["seed"])
    losses = []
    for _ in range(int(hp["epochs"])):
        epoch = []
        for rows, frames, mask in _batches(items, rng.permutation(len(items)), batch_size, mean, std):
            real = rows >= 0
            t = np.zeros(batch_size, target.dtype)
            t[real] = target[rows[real]]
            params, opt_state, loss = step(params, opt_state, frames, mask, t, real.astype(np.float32))
            epoch.append(float(loss))
        losses.append(float(np.mean(epoch)))
    hp["batch_size"] = batch_size
    return Fitted(graphdef, params, mean, std, task, classes, y_mean, y_std, hp, losses)


def predict(fitted: Fitted, items: list[np.ndarray], *, attention: bool = False):
    """Classification: (predicted labels [N], class probabilities [N, C]); regression: predictions [N].
    With `attention`, also each item's attention weights over its own frames (heads x T_i arrays)."""

    @jax.jit
    def forward(params, frames, mask):
        model = nnx.merge(fitted.graphdef, params)
        return model(frames, mask), model.attention(frames, mask)

    batch_size = fitted.hyperparameters["batch_size"]
    outs, weights = [], []
    for rows, frames, mask in _batches(items, np.arange(len(items)), batch_size, fitted.mean, fitted.std):
        out, att = forward(fitted.state, frames, mask)
        real = rows >= 0
        outs.append(np.asarray(out, np.float64)[real])
        weights += [np.asarray(att[r, :, : len(items[i])]) for r, i in enumerate(rows) if i >= 0]
    out = np.concatenate(outs) if outs else np.zeros((0, 1))
    if fitted.task == "classification":
        proba = np.asarray(jax.nn.softmax(out, axis=-1), np.float64)
        result = (fitted.classes[np.argmax(proba, axis=1)], proba)
    else:
        result = out[:, 0] * fitted.y_std + fitted.y_mean
    return (result, weights) if attention else result
