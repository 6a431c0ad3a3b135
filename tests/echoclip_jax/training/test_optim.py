"""Schedule, weight-decay mask, freezing and gradient accumulation of echoclip_jax.training.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from echoclip_jax.config.defaults import get_base_config
from echoclip_jax.training import optim


def _cfg(**kw):
    c = get_base_config().optim
    for k, v in kw.items():
        c[k] = v
    return c


PARAMS = {
    "visual": {
        "stem": {"kernel": jnp.ones((3, 3, 3, 4))},
        "norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
        "head": {"kernel": jnp.ones((4, 8))},
    },
    "token_embedding": {"embedding": jnp.ones((10, 8))},
    "positional_embedding": jnp.ones((5, 8)),
    "transformer": {"ln_1": {"scale": jnp.ones(8)}, "mlp": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones(16)}},
    "text_projection": jnp.ones((8, 8)),
    "logit_scale": jnp.array(2.0),
}


def test_schedule_warms_up_linearly_then_cosines_to_end():
    s = optim.make_schedule(_cfg(lr=5e-5, warmup_steps=2000, end_lr_factor=0.0), 10000)
    np.testing.assert_allclose(s(0), 0.0)
    np.testing.assert_allclose(s(1000), 2.5e-5, rtol=1e-5)
    np.testing.assert_allclose(s(2000), 5e-5, rtol=1e-5)
    np.testing.assert_allclose(s(6000), 2.5e-5, rtol=1e-4)  # half-way through the cosine
    np.testing.assert_allclose(s(10000), 0.0, atol=1e-12)


def test_weight_decay_mask_skips_norms_biases_embeddings_logit_scale():
    mask = jax.tree.map_with_path(optim.decays, PARAMS)
    assert mask["visual"]["stem"]["kernel"] and mask["visual"]["head"]["kernel"]
    assert mask["transformer"]["mlp"]["kernel"] and mask["text_projection"]
    assert not mask["visual"]["norm"]["scale"] and not mask["visual"]["norm"]["bias"]
    assert not mask["token_embedding"]["embedding"] and not mask["positional_embedding"]
    assert not mask["transformer"]["ln_1"]["scale"] and not mask["transformer"]["mlp"]["bias"]
    assert not mask["logit_scale"]


def test_decay_applies_only_where_masked():
    tx, _ = optim.make_optimizer(_cfg(lr=1.0, warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0), 10, PARAMS)
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    state = tx.init(PARAMS)
    updates, _ = tx.update(zero_grads, state, PARAMS)
    mask = jax.tree.map_with_path(optim.decays, PARAMS)
    for m, u in zip(jax.tree.leaves(mask), jax.tree.leaves(updates)):
        assert bool(jnp.any(u != 0)) == m


@pytest.mark.parametrize("freeze", ["vision", "text"])
def test_freezing_a_tower_leaves_it_unchanged(freeze):
    tx, _ = optim.make_optimizer(_cfg(lr=0.1, warmup_steps=0, freeze=freeze), 10, PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    state = tx.init(PARAMS)
    for _ in range(2):
        updates, state = tx.update(grads, state, PARAMS)
    for path, u in jax.tree.leaves_with_path(updates):
        frozen = optim.tower(path) == freeze
        assert bool(jnp.all(u == 0)) == frozen, path


def test_clipping_bounds_the_global_gradient_norm():
    # a huge eps turns Adam into SGD scaled by 1/eps, so the update shows the clipped gradient
    def first_update(clip, g):
        p = {"w": jnp.ones((2, 2))}
        tx, _ = optim.make_optimizer(
            _cfg(lr=1.0, warmup_steps=0, grad_clip_norm=clip, weight_decay=0.0, b1=0.0, b2=0.0, eps=1e6), 10, p
        )
        u, _ = tx.update({"w": jnp.full((2, 2), g)}, tx.init(p), p)
        return float(jnp.linalg.norm(u["w"]))

    np.testing.assert_allclose(first_update(1.0, 10.0), first_update(1.0, 100.0), rtol=1e-4)
    np.testing.assert_allclose(first_update(0.0, 100.0) / first_update(0.0, 10.0), 10.0, rtol=1e-4)


def test_accumulation_averages_micro_batch_gradients():
    params = {"w": jnp.array([1.0, -2.0])}
    batch = {"x": jnp.arange(12.0).reshape(6, 2)}

    def loss_and_grad(p, b):
        f = lambda p: (jnp.mean((b["x"] @ p["w"]) ** 2), {"n": jnp.float32(b["x"].shape[0])})
        (loss, aux), g = jax.value_and_grad(f, has_aux=True)(p)
        return (loss, aux), g

    (l3, aux), g3 = optim.accumulate_gradients(loss_and_grad, params, batch, 3)
    parts = [loss_and_grad(params, {"x": batch["x"][i * 2 : (i + 1) * 2]}) for i in range(3)]
    np.testing.assert_allclose(l3, np.mean([p[0][0] for p in parts]), rtol=1e-6)
    np.testing.assert_allclose(g3["w"], np.mean([p[1]["w"] for p in parts], axis=0), rtol=1e-6)
    assert float(aux["n"]) == 2.0
    with pytest.raises(ValueError, match="grad_accum_steps"):
        optim.accumulate_gradients(loss_and_grad, params, batch, 4)


def _decay_params():
    return {
        "w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32),
        "norm": {"scale": jnp.linspace(0.5, 1.5, 3)},
        "b": jnp.zeros(3),
    }


def test_adamw_matches_optax_adamw_with_decay_mask():
    # same hyper-parameters, schedule and mask: our AdamW must follow optax's (and so PyTorch's) AdamW
    cfg = _cfg(lr=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip_norm=0.0, b1=0.9, b2=0.98, eps=1e-6)
    p = _decay_params()
    tx, schedule = optim.make_optimizer(cfg, 10, p)
    ref = optax.adamw(
        schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, mask=jax.tree.map_with_path(optim.decays, p)
    )
    ours, theirs = (p, tx.init(p)), (p, ref.init(p))
    rng = np.random.default_rng(2)
    for _ in range(5):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
        u, s = tx.update(g, ours[1], ours[0])
        ours = (optax.apply_updates(ours[0], u), s)
        u, s = ref.update(g, theirs[1], theirs[0])
        theirs = (optax.apply_updates(theirs[0], u), s)
    for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(theirs[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(ours[0]["w"], p["w"])  # it moved


def test_adamw_skipped_step_changes_nothing_even_with_nan_gradients():
    cfg = _cfg(lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip_norm=1.0)
    p = _decay_params()
    tx, _ = optim.make_optimizer(cfg, 10, p)
    g = jax.tree.map(jnp.ones_like, p)
    u, s1 = tx.update(g, tx.init(p), p)
    p1 = optax.apply_updates(p, u)
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
    u, s_skip = jax.jit(lambda g, s, q: tx.update(g, s, q, apply=jnp.array(False)))(nan, s1, p1)
    p_skip = optax.apply_updates(p1, u)
    for a, b in zip(jax.tree.leaves((p_skip, s_skip)), jax.tree.leaves((p1, s1))):
        np.testing.assert_array_equal(a, b)  # bit for bit
    # and the run goes on as if the skipped step never happened
    u, s2 = tx.update(g, s_skip, p_skip)
    u_ref, s2_ref = tx.update(g, s1, p1)
    for a, b in zip(jax.tree.leaves((u, s2)), jax.tree.leaves((u_ref, s2_ref))):
        np.testing.assert_array_equal(a, b)


def test_adamw_donated_update_copies_no_state_buffer():
    # the skip switch must not cost a copy of every parameter and moment per step (the old select did)
    p = {"w": jnp.ones((64, 32)), "norm": {"scale": jnp.ones(32)}}
    tx, _ = optim.make_optimizer(_cfg(lr=1e-3, warmup_steps=0), 10, p)

    def step(state, g):
        ok = jnp.isfinite(optax.global_norm(g))
        u, opt = tx.update(g, state[1], state[0], apply=ok)
        return optax.apply_updates(state[0], u), opt

    state = (p, tx.init(p))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    memory = jax.jit(step, donate_argnums=0).lower(state, p).compile().memory_analysis()
    # every parameter and moment is updated in place (donated); temporaries hold about one update of the
    # largest parameter, far from a copy of the state (parameters + 2 moments) that a select would make
    assert memory.alias_size_in_bytes >= state_bytes - 64
    assert memory.temp_size_in_bytes < 0.5 * state_bytes, (memory.temp_size_in_bytes, state_bytes)
