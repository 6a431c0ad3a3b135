"""Small building blocks shared by the towers, each parameter tagged with logical axis names.

Parameters are created with `eager_sharding=False`: the model is built without a mesh, and the
training config maps the logical names ("embed", "mlp", "heads", "kv", "vocab", "joint") to mesh axes
afterwards (`nnx.get_partition_spec` under `flax.core.spmd.logical_axis_rules`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from echoclip_jax.models import backend
from echoclip_jax.models.depthwise_conv import depthwise_conv2d


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: tuple, dtype) -> nnx.Param:
    """A parameter initialised by `init` and tagged with one logical axis name per dimension."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match parameter shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=names, eager_sharding=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x, kernel, n_in: int = 1):
    """x [..., *in] . kernel [*in, *out] -> [..., *out]: the kernel's first `n_in` axes contracted with x's last.

    The forward is the plain product. The custom VJP fixes the kernel gradient's operand order,
    activations first (dk = x^T g). JAX's own transpose rule computes (g^T x)^T, and XLA:CPU then
    materialises g^T. For a projection that feeds the residual stream, g is a sum over every later
    layer's contribution. XLA fuses that whole sum into the transposed copy, re-reading about 20
    activation-sized inputs per layer; with x^T g that copy is not made (BENCHMARKS.md).
    Only the leading (batch, token) axes are merged; the kernel keeps its axes (e.g. sharded "heads").
    """
    return _project(x, kernel, n_in)


def _project(x, kernel, n_in):
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


def _project_fwd(x, kernel, n_in):
    return _project(x, kernel, n_in), (x, kernel)


def _project_bwd(n_in, res, g):
    x, kernel = res
    n_lead = x.ndim - n_in
    dx = jax.lax.dot_general(g, kernel, ((tuple(range(n_lead, g.ndim)), tuple(range(n_in, kernel.ndim))), ((), ())))
    # Leading (batch, token) axes merged into one: XLA:CPU's matmul reads a single contracted leading
    # axis in place, where several would be transposed into a copy first.
    x2, g2 = x.reshape((-1,) + x.shape[n_lead:]), g.reshape((-1,) + g.shape[n_lead:])
    dk = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Linear(nnx.Module):
    """y = x @ kernel + bias with kernel [in, out]; computes in `dtype`, stores in `param_dtype`."""

    def __init__(
        self,
        din: int,
        dout: int,
        *,
        names: tuple,
        use_bias: bool = True,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
        kernel_init=None,
    ):
        kernel_init = kernel_init or nnx.initializers.normal(stddev=din**-0.5)
        self.kernel = param(rngs, kernel_init, (din, dout), names, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dout,), names[1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = project(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _mean_last(x):
    """Mean over the last axis (kept). On CPU it is a product with a 1/n column. XLA:CPU fuses what feeds a
    reduction into a YNNPACK fusion that takes every input materialised: before ConvNeXt's norm, 49
    shifted copies and 49 broadcast kernels of each depthwise convolution. A product takes one
    materialised input (BENCHMARKS.md). Other backends fuse reductions well and keep `mean`. Decided by
    `backend.mean_as_product` for the platform compiled for."""
    if backend.mean_as_product():
        return x @ jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
    return jnp.mean(x, axis=-1, keepdims=True)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32 (as PyTorch autocast does), output in `dtype`."""

    def __init__(
        self, dim: int, *, eps: float, name: str = "embed", dtype="float32", param_dtype="float32", rngs: nnx.Rngs
    ):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (name,), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (name,), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = _mean_last(x32)
        var = _mean_last(jnp.square(x32 - mean))
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Conv(nnx.Module):
    """Dense NHWC convolution, kernel [k, k, in, out], 'VALID' padding (patchify stems, downsampling).

    Only the output channels carry "embed": one mesh axis may appear once in a PartitionSpec.
    """

    def __init__(
        self,
        din: int,
        dout: int,
        kernel: int,
        stride: int,
        *,
        use_bias: bool = True,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        fan_in = din * kernel * kernel
        self.kernel = param(
            rngs,
            nnx.initializers.normal(stddev=fan_in**-0.5),
            (kernel, kernel, din, dout),
            (None, None, None, "embed"),
            param_dtype,
        )
        self.bias = param(rngs, nnx.initializers.zeros, (dout,), ("embed",), param_dtype) if use_bias else None
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            (self.stride, self.stride),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class DepthwiseConv(nnx.Module):
    """Depthwise 'SAME' convolution (ConvNeXt's 7x7), kernel [k, k, C]; backend-specific implementation."""

    def __init__(
        self, dim: int, kernel: int = 7, *, impl: str = "auto", dtype="float32", param_dtype="float32", rngs: nnx.Rngs
    ):
        self.kernel = param(
            rngs,
            nnx.initializers.normal(stddev=(kernel * kernel) ** -0.5),
            (kernel, kernel, dim),
            (None, None, "embed"),
            param_dtype,
        )
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)
        self.impl = impl
        self.dtype = dtype

    def __call__(self, x):
        # per device on its own rows, the (tiny) kernel gathered whole: see backend.batch_local
        conv = lambda h, k: depthwise_conv2d(h, k, impl=self.impl)
        y = backend.batch_local(conv, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class DropPath(nnx.Module):
    """Stochastic depth: drops a whole residual branch per sample (one mask value per batch row)."""

    def __init__(self, rate: float, ndim: int, *, rngs: nnx.Rngs):
        self.dropout = nnx.Dropout(rate, broadcast_dims=tuple(range(1, ndim)), rngs=rngs)

    def __call__(self, x):
        return self.dropout(x)


_SQRT_HALF = 0.7071067811865476


def gelu(x):
    """Exact GELU as torch.nn.GELU() (timm, open_clip) computes it: 0.5 x (1 + erf(x / sqrt 2)).

    Not `jax.nn.gelu(approximate=False)`, which goes through erfc: XLA:CPU lowers erfc with an exp
    and two rational branches, erf with one polynomial, and the erf form is PyTorch's own formula.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF).astype(x.dtype))
