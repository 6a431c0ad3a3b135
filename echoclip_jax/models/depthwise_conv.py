"""Depthwise 2-D convolution ('SAME', stride 1), implemented per backend.

XLA's CPU grouped convolution (`feature_group_count=C`) is far slower than PyTorch's for ConvNeXt's
7x7 depthwise kernel, and its gradient slower still (BENCHMARKS.md). On CPU we therefore use one of two
forms. Large feature maps take k*k shifted multiply-adds ("shifted"), with a custom VJP whose
backward pass is also shifted sums for the input gradient (the same correlation with the flipped
kernel) and k per-channel matmuls for the kernel gradient. Maps of at most 64 positions ("matmul") take one
[HW, HW] matrix per channel, built from the kernel. Its product with the flattened map is a plain
matmul, forward and backward: more multiply-adds, but no materialised shifted copies.
On GPU/TPU `lax.conv_general_dilated` is kept: cuDNN and the TPU compiler handle it well. Which form
"auto" takes is decided by `backend.depthwise_impl`, for the platform the program is compiled for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from echoclip_jax.models import backend

IMPLS = backend.DEPTHWISE_IMPLS
MATMUL_MAX_POSITIONS = backend.MATMUL_MAX_POSITIONS


def _conv_lax(x, kernel):
    k, _, c = kernel.shape
    return jax.lax.conv_general_dilated(
        x, kernel.reshape(k, k, 1, c), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c
    )


def _correlate(xpad, kernel, h, w):
    """sum_{i,j} xpad[:, i:i+h, j:j+w, :] * kernel[i, j] with float32 accumulation for low precision."""
    k = kernel.shape[0]
    acc_dtype = jnp.promote_types(xpad.dtype, jnp.float32)
    out = jnp.zeros(xpad.shape[:1] + (h, w) + xpad.shape[3:], acc_dtype)
    for i in range(k):
        for j in range(k):
            out = out + (xpad[:, i : i + h, j : j + w, :] * kernel[i, j]).astype(acc_dtype)
    return out.astype(xpad.dtype)


def _pad(x, p):
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


@jax.custom_vjp
def _conv_shifted(x, kernel):
    k = kernel.shape[0]
    return _correlate(_pad(x, k // 2), kernel, x.shape[1], x.shape[2])


def _conv_shifted_fwd(x, kernel):
    return _conv_shifted(x, kernel), (x, kernel)


def _conv_shifted_bwd(res, g):
    x, kernel = res
    k = kernel.shape[0]
    h, w = x.shape[1], x.shape[2]
    # d/dx: correlate the padded cotangent with the kernel flipped in both spatial axes.
    dx = _correlate(_pad(g, k // 2), kernel[::-1, ::-1], h, w)
    return dx, _kernel_grad(_pad(x, k // 2), g, k).astype(kernel.dtype)


def _kernel_grad(xpad, g, k):
    """d/dkernel[i, j, c] = sum_{b, y, x} xpad[b, y+i, x+j, c] * g[b, y, x, c], per kernel row i as one
    matmul per channel over (batch, row): a[c, x, x'] = sum_{b, y} g[b, y, x, c] * xpad[b, y+i, x', c];
    then dkernel[i, j, c] = sum_x a[c, x, x+j], the first k diagonals, read by one skewed reshape.

    Not k*k separate reductions: XLA:CPU gives each one a materialised shifted copy of the input and
    recomputes that input's producer (a LayerNorm) for each (BENCHMARKS.md).
    """
    b, h, w, c = g.shape
    wp = w + k - 1
    gt = jnp.transpose(g, (3, 2, 0, 1)).reshape(c, w, b * h)  # [C, x, (b, y)]
    xt = jnp.transpose(xpad, (3, 0, 1, 2))  # [C, B, H + k - 1, W + k - 1]
    rows = []
    for i in range(k):
        xi = xt[:, :, i : i + h].reshape(c, b * h, wp)  # [C, (b, y), x']
        a = jnp.einsum("cvn,cnu->cvu", gt, xi, preferred_element_type=jnp.float32)  # [C, x, x']
        # a[c, x, x + j] sits at x * (wp + 1) + j of the flattened rows, padded to w * (wp + 1)
        skewed = jnp.pad(a.reshape(c, w * wp), ((0, 0), (0, w))).reshape(c, w, wp + 1)
        rows.append(jnp.sum(skewed[:, :, :k], axis=1))  # [C, k]
    return jnp.transpose(jnp.stack(rows), (0, 2, 1))  # [k, k, C]


_conv_shifted.defvjp(_conv_shifted_fwd, _conv_shifted_bwd)


def _band(n: int, k: int, dtype):
    """[n, n, k] one-hot: band[p, q, a] = 1 where input q feeds output p through tap a (q = p + a - k//2)."""
    a = np.arange(n)[None, :] - np.arange(n)[:, None] + k // 2
    return jnp.asarray(a[..., None] == np.arange(k), dtype)


def _conv_matmul(x, kernel):
    """y[b, p, c] = sum_q m[c, p, q] x[b, q, c] over the flattened positions, m[c] built from kernel[:, :, c]."""
    b, h, w, c = x.shape
    k = kernel.shape[0]
    m = jnp.einsum("ika,jlb,abc->cijkl", _band(h, k, kernel.dtype), _band(w, k, kernel.dtype), kernel)
    y = jnp.einsum("cpq,bqc->bpc", m.reshape(c, h * w, h * w), x.reshape(b, h * w, c))
    return y.reshape(b, h, w, c)


def depthwise_conv2d(x, kernel, bias=None, *, impl: str = "auto"):
    """x [B, H, W, C], kernel [k, k, C] (k odd), bias [C] -> [B, H, W, C], zero 'SAME' padding.

    impl: "auto" (on CPU: matmul up to MATMUL_MAX_POSITIONS positions, shifted sums above; lax.conv
    elsewhere; see backend.depthwise_impl), "shifted", "matmul" or "lax".
    """
    k = kernel.shape[0]
    if kernel.ndim != 3 or kernel.shape[1] != k or k % 2 != 1 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"depthwise kernel must be [k, k, C] with odd k and C={x.shape[-1]}, got {kernel.shape}")
    conv = {"shifted": _conv_shifted, "matmul": _conv_matmul, "lax": _conv_lax}[
        resolve_impl(impl, x.shape[1] * x.shape[2])
    ]
    y = conv(x, kernel)
    return y if bias is None else y + bias


def resolve_impl(impl: str, positions: int) -> str:
    """ "auto" -> the implementation for a feature map of `positions` (H*W) on the platform traced for."""
    return backend.depthwise_impl(impl, positions)
