"""The train step: the model (abstract), its shardings, the optimiser and the jitted update step for a mesh,
shared by training, the benchmarks and the compile-for-a-pod check.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from echoclip_jax import models
from echoclip_jax.models import backend
from echoclip_jax.runtime import sharding
from echoclip_jax.training import losses, optim
from echoclip_jax.weights import loader as weights


def compiled_flops(compiled) -> float | None:
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
        spec = (
            weights.parse(f"orbax:{config.init.path}")
            if kind == "checkpoint"  # a workdir may name W@STEP
            else weights.Spec("open_clip", config.init.path)
        )
        _, flat = weights.load(spec, config.model)
        loaded = weights.nested(flat)
    else:
        raise ValueError(f"init.kind {kind!r}: expected random, open_clip or checkpoint")
    want = jax.tree.structure(abstract_params)
    if jax.tree.structure(loaded) != want:
        raise ValueError(f"init.path {config.init.path}: parameter tree does not match config.model")
    for (path, a), b in zip(jax.tree.leaves_with_path(abstract_params), jax.tree.leaves(loaded)):
        if tuple(a.shape) != tuple(np.shape(b)):
            raise ValueError(
                f"init.path {config.init.path}: {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(b)}, config.model wants {a.shape}"
            )
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
    state_sh = {
        "step": repl,
        "params": param_sh,
        "opt_state": sharding.like_params(abs_opt, abs_params, param_sh, mesh),
        "rng": repl,
        "bad_step": repl,
    }
    loss_fn = losses.make_loss_fn(config.loss, mesh)
    max_ls = float(config.loss.max_logit_scale)
    accum = int(config.optim.grad_accum_steps)
    stop_on_nan = config.optim.nan_policy == "stop"

    def fresh_rest(rng):
        """The model's non-parameter state (dropout / drop-path RNG streams), derived from the step RNG."""
        leaves, tree = jax.tree.flatten(abs_rest)
        out = [
            jax.random.fold_in(rng, i) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.zeros(x.shape, x.dtype)
            for i, x in enumerate(leaves)
        ]
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
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "logit_scale": jnp.exp(new_state["params"]["logit_scale"]),
            "skipped": 1 - apply.astype(jnp.int32),
        }
        return new_state, metrics

    batch_sh = {
        "images": sharding.batch_sharding(mesh, 5 if config.data.frames_per_sample > 1 else 4),
        "tokens": sharding.batch_sharding(mesh, 2),
    }
    # traced for the mesh's platform, not this host's default backend (they differ in echoclip_jax.aot)
    p_train_step = jax.jit(
        backend.for_mesh(mesh, train_step),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )

    def embed(params, batch):
        img, txt, _, _ = forward(eval_graph, params, fresh_rest(jax.random.key(0)), batch)
        return img, txt

    p_embed = jax.jit(backend.for_mesh(mesh, embed), in_shardings=(param_sh, batch_sh), out_shardings=repl)
    init_state = jax.jit(
        lambda p: {
            "step": jnp.zeros((), jnp.int32),
            "params": p,
            "opt_state": tx.init(p),
            "rng": jax.random.key_data(jax.random.key(config.seed)),
            "bad_step": jnp.full((), -1, jnp.int32),
        },
        in_shardings=(param_sh,),
        out_shardings=state_sh,
    )
    abs_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abs_params,
        "opt_state": abs_opt,
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        "bad_step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, state_sh)
    return TrainStep(
        step=p_train_step,
        init_state=init_state,
        embed=p_embed,
        abs_params=abs_params,
        abs_state=abs_state,
        param_sh=param_sh,
        state_sh=state_sh,
        batch_sh=batch_sh,
        schedule=schedule,
    )
