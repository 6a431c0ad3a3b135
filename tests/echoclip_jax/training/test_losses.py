"""The shard_map losses equal the plain global-batch losses, values and gradients, on the 8-device mesh."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from echoclip_jax.runtime import sharding
from echoclip_jax.training import losses


def _cfg(name, impl, chunk=0):
    return ml_collections.ConfigDict(dict(name=name, impl=impl, chunk_size=chunk, max_logit_scale=math.log(100.0)))


def _mesh(data, fsdp, tensor):
    return sharding.build_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def _inputs(n=32, d=16, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (n, d))
    txt = img + 0.8 * jax.random.normal(k2, (n, d))  # correlated pairs: a non-trivial loss
    norm = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
    return norm(img), norm(txt)


def test_clip_plain_matches_hand_computed_cross_entropy():
    img, txt = _inputs(6, 4)
    scale = 10.0
    logits = np.asarray(scale * img @ txt.T, np.float64)
    ce = lambda L: np.mean([-L[i, i] + np.log(np.exp(L[i]).sum()) for i in range(len(L))])
    want = 0.5 * (ce(logits) + ce(logits.T))
    got = losses.make_loss_fn(_cfg("clip", "plain"))(img, txt, jnp.log(scale))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_siglip_plain_matches_hand_computed():
    img, txt = _inputs(5, 4)
    scale, bias = 10.0, -3.0
    L = np.asarray(scale * img @ txt.T + bias, np.float64)
    y = 2 * np.eye(5) - 1
    want = np.sum(np.log1p(np.exp(-y * L))) / 5
    got = losses.make_loss_fn(_cfg("siglip", "plain"))(img, txt, jnp.log(scale), jnp.float32(bias))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_logit_scale_is_clamped_at_ln100():
    img, txt = _inputs(8, 4)
    f = losses.make_loss_fn(_cfg("clip", "plain"))
    np.testing.assert_allclose(f(img, txt, jnp.float32(9.0)), f(img, txt, jnp.float32(math.log(100.0))), rtol=1e-6)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize(
    "impl,chunk,mesh_shape",
    [
        ("allgather", 0, (8, 1, 1)),
        ("allgather", 8, (2, 2, 2)),
        ("ring", 0, (8, 1, 1)),
        ("ring", 2, (2, 4, 1)),
    ],
)
def test_sharded_equals_plain_with_gradients(name, impl, chunk, mesh_shape):
    mesh = _mesh(*mesh_shape)
    img, txt = _inputs(32, 16, seed=1)
    bsh = sharding.batch_sharding(mesh, 2)
    img, txt = jax.device_put(img, bsh), jax.device_put(txt, bsh)
    ls, lb = jnp.float32(math.log(12.0)), jnp.float32(-4.0)
    plain = losses.make_loss_fn(_cfg(name, "plain"))
    sharded = losses.make_loss_fn(_cfg(name, impl, chunk), mesh)
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(img, txt, ls, lb)
    (v0, g0), (v1, g1) = grad(plain), grad(sharded)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="loss.impl"):
        losses.make_loss_fn(_cfg("clip", "nope"), _mesh(8, 1, 1))
    with pytest.raises(ValueError, match="logit bias"):
        losses.make_loss_fn(_cfg("siglip", "plain"))(*_inputs(4, 4), jnp.float32(1.0), None)
