"""The dual encoder: shapes, normalisation, pooling, video embedding, dtypes, remat, sharding metadata."""

import pathlib

import flax.core.spmd
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from echoclip_jax.config import files
from echoclip_jax.models import build_model, preprocess_images
from echoclip_jax.models.layers import gelu
from echoclip_jax.models.transformer import Attention

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"

VOCAB = {"embed", "mlp", "heads", "kv", "vocab", "joint", None}


def tiny_config(**overrides):
    mc = files.load(CONFIGS / "tiny.py").model
    mc.vision.image_size = 32
    mc.text.layers = 2
    for k, v in overrides.items():
        node = mc
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return mc


def inputs(b=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = preprocess_images(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8))
    tokens = np.zeros((b, 77), np.int32)
    tokens[:, 0] = 49406
    tokens[:, 1:6] = rng.integers(1, 49000, (b, 5))
    tokens[:, 6] = 49407
    return images, jnp.asarray(tokens)


@pytest.fixture(scope="module")
def model():
    m = build_model(tiny_config(), rngs=nnx.Rngs(0))
    m.eval()
    return m


def test_call_returns_normalised_embeddings(model):
    images, tokens = inputs()
    img, txt = model(images, tokens)
    assert img.shape == txt.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
    assert isinstance(model.logit_scale, nnx.Param) and model.logit_scale.shape == ()
    np.testing.assert_allclose(model.logit_scale[...], np.log(1 / 0.07), rtol=1e-6)
    assert model.logit_bias is None


def test_video_embedding_is_renormalised_mean_of_frames(model):
    images, _ = inputs(b=6)
    videos = images.reshape(2, 3, 32, 32, 3)
    frames = np.asarray(model.encode_image(images)).reshape(2, 3, -1)
    mean = frames.mean(axis=1)
    expected = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(model.encode_video(videos), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model(videos, inputs()[1])[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~30 s on the 2-core box (compiling the gradient)
def test_attention_temporal_pool_starts_as_mean_and_learns():
    m = build_model(tiny_config(temporal_pool="attention"), rngs=nnx.Rngs(0))
    m.eval()
    images, _ = inputs(b=4)
    videos = images.reshape(2, 2, 32, 32, 3)
    frames = np.asarray(m.encode_image(images)).reshape(2, 2, -1).mean(1)
    np.testing.assert_allclose(
        m.encode_video(videos), frames / np.linalg.norm(frames, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6
    )
    grads = nnx.jit(nnx.grad(lambda mm: jnp.sum(mm.encode_video(videos)[:, 0])))(m)
    assert float(jnp.abs(grads.temporal_pool.out[...]).max()) > 0


def test_text_pooling_argmax_and_eos():
    m = build_model(tiny_config(), rngs=nnx.Rngs(1))
    m.eval()
    _, tokens = inputs()
    base = m.encode_text(tokens)
    # causal mask + pooling at the EOT: tokens after it cannot change the embedding, tokens before do
    np.testing.assert_allclose(m.encode_text(tokens.at[:, 10].set(123)), base, rtol=1e-5, atol=1e-6)
    assert not np.allclose(m.encode_text(tokens.at[:, 3].set(123)), base, atol=1e-4)

    r = build_model(tiny_config(**{"text.vocab_size": 909, "text.pool": "eos", "text.eos_id": 908}), rngs=nnx.Rngs(1))
    r.eval()
    t = np.zeros((1, 77), np.int32)
    t[0, :4] = [907, 5, 6, 908]
    t[0, 4:] = 900  # high ids after EOS: argmax pooling would pick these, eos pooling must not
    e = r.encode_text(jnp.asarray(t))
    t2 = t.copy()
    t2[0, 4:] = 3
    np.testing.assert_allclose(r.encode_text(jnp.asarray(t2)), e, rtol=1e-5, atol=1e-6)


def test_logit_bias_and_bad_config():
    m = build_model(tiny_config(init_logit_bias=-10.0), rngs=nnx.Rngs(0))
    assert isinstance(m.logit_bias, nnx.Param) and float(m.logit_bias[...]) == -10.0
    with pytest.raises(ValueError, match="variant"):
        build_model(tiny_config(**{"vision.variant": "huge"}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vision.kind"):
        build_model(tiny_config(**{"vision.kind": "resnet"}), rngs=nnx.Rngs(0))


def test_every_param_has_logical_axes_from_the_vocabulary():
    for overrides in ({}, {"vision.kind": "vit", "vision.variant": "tiny", "temporal_pool": "attention"}):
        m = nnx.eval_shape(lambda: build_model(tiny_config(**overrides), rngs=nnx.Rngs(0)))
        for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.shape), path
            assert set(names) <= VOCAB, (path, names)


def test_bf16_compute_keeps_fp32_params_and_agrees():
    m32 = build_model(tiny_config(), rngs=nnx.Rngs(0))
    m16 = build_model(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
    m32.eval(), m16.eval()
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    images, tokens = inputs()
    a, b = m32(images, tokens), m16(images, tokens)
    for x, y in zip(a, b):
        assert y.dtype == jnp.float32
        assert float(jnp.min(jnp.sum(x * y, -1))) > 0.98  # cosine similarity of fp32 vs bf16 embeddings


@pytest.mark.slow  # ~100 s on the 2-core box (two gradient compilations)
def test_remat_and_drop_path_train_mode():
    images, tokens = inputs()
    outs = []
    for remat in (False, True):
        m = build_model(tiny_config(remat=remat), rngs=nnx.Rngs(0))
        m.eval()
        loss = lambda mm: jnp.sum(mm(images, tokens)[0] * mm(images, tokens)[1])
        outs.append(nnx.jit(nnx.grad(loss))(m))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    m = build_model(tiny_config(**{"vision.drop_path_rate": 0.5}), rngs=nnx.Rngs(0))
    encode = nnx.jit(lambda mm, x: mm.encode_image(x))
    m.train()
    first = encode(m, images)
    assert not np.allclose(first, encode(m, images))  # fresh masks each call
    m.eval()
    np.testing.assert_array_equal(encode(m, images), encode(m, images))


def test_runs_sharded_with_params_split_over_8_devices():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    m = build_model(tiny_config(), rngs=nnx.Rngs(0))
    m.eval()
    images, tokens = inputs(b=8)
    expected = nnx.jit(lambda mm, i, t: mm(i, t))(m, images, tokens)
    graphdef, state = nnx.split(m)
    rules = (("embed", "fsdp"), ("batch", "fsdp")) + tuple((n, None) for n in ("mlp", "heads", "kv", "vocab", "joint"))
    with flax.core.spmd.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    state = jax.device_put(state, shardings)
    emb = state["text"]["token_embedding"][...]
    assert emb.sharding.spec == P(None, "fsdp")
    assert {s.data.shape for s in emb.addressable_shards} == {(49408, 128 // 8)}
    fc1 = state["visual"]["stages"][1]["blocks"][0]["fc1"]["kernel"][...]
    assert fc1.sharding.spec == P("fsdp", None) and len(fc1.sharding.device_set) == 8

    @jax.jit
    def forward(state, images, tokens):
        return nnx.merge(graphdef, state)(images, tokens)

    batch = NamedSharding(mesh, P("fsdp"))
    out = forward(state, jax.device_put(images, batch), jax.device_put(tokens, batch))
    for a, b in zip(out, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gelu_is_exact_gelu_in_values_and_gradients():
    """layers.gelu uses PyTorch's erf formula (cheaper on XLA:CPU than jax.nn.gelu's erfc); it must be the
    same function, tails included, and have the same derivative."""

    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2401), jnp.asarray([-1e4, -40.0, 0.0, 40.0, 1e4])])
    # absolute tolerance: in the far-negative tail 1 + erf cancels, so (as in PyTorch) values ~1e-7 are
    # exact only to ~5e-7 absolute
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    grad = jax.vmap(jax.grad(gelu))(x)
    ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-6)


def _attention_per_head_reference(attn, x, causal):
    """Attention written head by head from the stored [width, 3, heads, hd] / [heads, hd, width] weights."""
    w, bias = attn.qkv_kernel[...], attn.qkv_bias[...]
    n, heads, hd = x.shape[1], w.shape[2], w.shape[3]
    out = attn.out_bias[...]
    for h in range(heads):
        q, k, v = (x @ w[:, t, h] + bias[t, h] for t in range(3))
        s = q @ jnp.swapaxes(k, 1, 2) / np.sqrt(hd)
        if causal:
            s = jnp.where(np.tril(np.ones((n, n), bool)), s, -jnp.inf)
        out = out + jax.nn.softmax(s, axis=-1) @ v @ attn.out_kernel[...][h]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_per_head_reference_values_and_gradients(causal):
    attn = Attention(48, 3, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
    graph, params = nnx.split(attn, nnx.Param)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)  # non-zero biases
    x = jnp.asarray(rng.normal(size=(2, 7, 48)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(2, 7, 48)), jnp.float32)

    def loss(fn):
        return lambda p, x: jnp.sum(fn(nnx.merge(graph, p), x) * ct)

    ours = loss(lambda a, x: a(x, causal))
    ref = loss(lambda a, x: _attention_per_head_reference(a, x, causal))
    np.testing.assert_allclose(ours(params, x), ref(params, x), rtol=1e-5)
    g_ours = jax.grad(ours, argnums=(0, 1))(params, x)
    g_ref = jax.grad(ref, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
