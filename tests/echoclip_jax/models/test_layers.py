"""Depthwise convolution (the CPU shifted-sum and matmul implementations vs lax.conv), projections' custom
gradient, drop path, preprocessing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echoclip_jax.models import backend, preprocess_images
from echoclip_jax.models.depthwise_conv import depthwise_conv2d
from echoclip_jax.models.layers import DropPath, project


@pytest.mark.parametrize("impl", ["shifted", "matmul"])
@pytest.mark.parametrize("k,shape", [(7, (2, 9, 11, 5)), (3, (1, 4, 4, 8)), (7, (2, 5, 20, 3)), (7, (3, 2, 2, 4))])
def test_cpu_depthwise_matches_lax_values_and_gradients(impl, k, shape):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, shape[-1])), jnp.float32)
    b = jnp.asarray(rng.normal(size=(shape[-1],)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=shape), jnp.float32)  # a random cotangent: all gradient entries matter

    def loss(impl):
        return lambda x, w, b: jnp.sum(depthwise_conv2d(x, w, b, impl=impl) * ct)

    np.testing.assert_allclose(
        depthwise_conv2d(x, w, b, impl=impl), depthwise_conv2d(x, w, b, impl="lax"), rtol=1e-5, atol=1e-5
    )
    g_ours = jax.grad(loss(impl), argnums=(0, 1, 2))(x, w, b)
    g_lax = jax.grad(loss("lax"), argnums=(0, 1, 2))(x, w, b)
    for a, r in zip(g_ours, g_lax):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["shifted", "matmul"])
def test_depthwise_numpy_reference_and_bad_kernel(impl):
    # a 3x3 kernel with one non-zero tap shifts the image: an independent, hand-checkable reference
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    w = jnp.zeros((3, 3, 1)).at[0, 0, 0].set(1.0)  # out[y, x] = in[y-1, x-1]
    y = depthwise_conv2d(x, w, impl=impl)
    np.testing.assert_array_equal(y[:, 1:, 1:, 0], x[:, :-1, :-1, 0])
    np.testing.assert_array_equal(y[:, 0, :, 0], 0)
    with pytest.raises(ValueError, match="odd k"):
        depthwise_conv2d(x, jnp.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="unknown depthwise conv impl"):
        depthwise_conv2d(x, w, impl="fft")


def test_auto_impl_on_cpu_is_matmul_up_to_8x8_and_shifted_above():
    """The choice (models/backend.py) by feature-map size, and auto giving lax's values and gradients."""

    assert backend.depthwise_impl("auto", 8 * 8) == "matmul" and backend.depthwise_impl("auto", 9 * 8) == "shifted"
    assert backend.depthwise_impl("lax", 8 * 8) == "lax"
    w = jax.random.normal(jax.random.key(1), (7, 7, 4))
    for shape in ((1, 8, 8, 4), (1, 9, 8, 4)):
        x = jax.random.normal(jax.random.key(2), shape)

        def loss(a, b, impl):
            return (depthwise_conv2d(a, b, impl=impl) ** 2).sum()

        np.testing.assert_allclose(depthwise_conv2d(x, w), depthwise_conv2d(x, w, impl="lax"), rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.grad(loss, (0, 1))(x, w, "auto"), jax.grad(loss, (0, 1))(x, w, "lax")):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "x_shape,k_shape,n_in", [((2, 5, 6), (6, 3, 2, 4), 1), ((2, 5, 3, 4), (3, 4, 6), 2), ((7, 6), (6, 5), 1)]
)
def test_project_matches_einsum_values_and_gradients(x_shape, k_shape, n_in):
    # the custom VJP only reorders the kernel gradient's product: every value must equal plain autodiff's
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    out_shape = x_shape[: len(x_shape) - n_in] + k_shape[n_in:]
    ct = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    def plain(x, k):
        return jnp.tensordot(x, k, axes=n_in)

    np.testing.assert_allclose(project(x, k, n_in), plain(x, k), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda x, k: jnp.sum(project(x, k, n_in) * ct), argnums=(0, 1))(x, k)
    ref = jax.grad(lambda x, k: jnp.sum(plain(x, k) * ct), argnums=(0, 1))(x, k)
    for a, r in zip(ours, ref):
        assert a.shape == r.shape
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_drop_path_is_per_sample_and_off_in_eval():
    layer = DropPath(0.5, 4, rngs=nnx.Rngs(0))
    x = jnp.ones((256, 3, 3, 2))
    y = layer(x)
    per_sample = y.reshape(256, -1)
    # every sample either dropped entirely or kept and scaled by 1/(1-p)
    assert set(np.unique(per_sample).tolist()) <= {0.0, 2.0}
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
    assert 0.3 < float(jnp.mean(per_sample[:, 0] > 0)) < 0.7
    layer.eval()
    np.testing.assert_array_equal(layer(x), x)


def test_preprocess_images_uses_clip_statistics():
    x = np.array([[[[0, 128, 255]]]], np.uint8)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    expected = (np.array([0, 128, 255]) / 255.0 - mean) / std
    out = preprocess_images(x)
    assert out.dtype == jnp.float32 and out.shape == (1, 1, 1, 3)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        preprocess_images(np.zeros((2, 4, 4), np.uint8))
