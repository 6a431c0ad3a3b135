"""Depthwise 2-D convolution ('SAME', stride 1), implemented per backend.

XLA's CPU grouped convolution (`feature_group_count=C`) is ~30x slower than PyTorch's for ConvNeXt's
7x7 depthwise kernel, and its gradient even slower (issue 10). On CPU we therefore write the
convolution as k*k shifted multiply-adds, with a custom VJP whose backward pass is also shifted sums
(input gradient = the same correlation with the flipped kernel; kernel gradient = k*k reductions).
On GPU/TPU `lax.conv_general_dilated` is kept: cuDNN and the TPU compiler handle it well.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _conv_lax(x, kernel):
    k, _, c = kernel.shape
    return jax.lax.conv_general_dilated(
        x, kernel.reshape(k, k, 1, c), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _correlate(xpad, kernel, h, w):
    """sum_{i,j} xpad[:, i:i+h, j:j+w, :] * kernel[i, j] with float32 accumulation for low precision."""
    k = kernel.shape[0]
    acc_dtype = jnp.promote_types(xpad.dtype, jnp.float32)
    out = jnp.zeros(xpad.shape[:1] + (h, w) + xpad.shape[3:], acc_dtype)
    for i in range(k):
        for j in range(k):
            out = out + (xpad[:, i:i + h, j:j + w, :] * kernel[i, j]).astype(acc_dtype)
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
    xpad = _pad(x, k // 2)
    grad = _kernel_grad_matmul if w <= MATMUL_KERNEL_GRAD_MAX_WIDTH else _kernel_grad_sums
    return dx, grad(xpad, g, k).astype(kernel.dtype)


# Widths up to this take the kernel gradient as k batched matmuls (bench/train_step.py, BENCHMARKS.md):
# 3.4x faster at 16x16 (ConvNeXt at 64 px), 1.2x at 14x14, but 1.1x slower at 56x56, where the
# matmul's (w + k - 1) / k extra multiply-adds outweigh its better use of the vector units.
MATMUL_KERNEL_GRAD_MAX_WIDTH = 16


def _kernel_grad_sums(xpad, g, k):
    """d/dkernel[i, j, c] = sum_{b, y, x} xpad[b, y+i, x+j, c] * g[b, y, x, c]: k*k reductions."""
    h, w = g.shape[1], g.shape[2]
    acc_dtype = jnp.promote_types(xpad.dtype, jnp.float32)
    g32 = g.astype(acc_dtype)
    return jnp.stack([jnp.stack([
        jnp.sum(xpad[:, i:i + h, j:j + w, :].astype(acc_dtype) * g32, axis=(0, 1, 2)) for j in range(k)])
        for i in range(k)])


def _kernel_grad_matmul(xpad, g, k):
    """The same sums, per kernel row i as one matmul per channel over (batch, row):
    a[c, x, x'] = sum_{b, y} g[b, y, x, c] * xpad[b, y+i, x', c]; then dkernel[i, j, c] = sum_x a[c, x, x+j]."""
    b, h, w, c = g.shape
    gt = jnp.transpose(g, (3, 2, 0, 1)).reshape(c, w, b * h)  # [C, x, (b, y)]
    xt = jnp.transpose(xpad, (3, 0, 1, 2))  # [C, B, H + k - 1, W + k - 1]
    rows = []
    for i in range(k):
        xi = xt[:, :, i:i + h].reshape(c, b * h, w + k - 1)  # [C, (b, y), x']
        a = jnp.einsum("cvn,cnu->cvu", gt, xi, preferred_element_type=jnp.float32)
        rows.append(jnp.stack([jnp.trace(a, offset=j, axis1=1, axis2=2) for j in range(k)]))
    return jnp.stack(rows)


_conv_shifted.defvjp(_conv_shifted_fwd, _conv_shifted_bwd)


def depthwise_conv2d(x, kernel, bias=None, *, impl: str = "auto"):
    """x [B, H, W, C], kernel [k, k, C] (k odd), bias [C] -> [B, H, W, C], zero 'SAME' padding.

    impl: "auto" (shifted sums on CPU, lax.conv elsewhere), "shifted" or "lax".
    """
    k = kernel.shape[0]
    if kernel.ndim != 3 or kernel.shape[1] != k or k % 2 != 1 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"depthwise kernel must be [k, k, C] with odd k and C={x.shape[-1]}, got {kernel.shape}")
    y = _conv_shifted(x, kernel) if resolve_impl(impl) == "shifted" else _conv_lax(x, kernel)
    return y if bias is None else y + bias


def resolve_impl(impl: str) -> str:
    """"auto" -> the implementation used on this backend; "shifted" and "lax" pass through."""
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "lax"
    if impl not in ("shifted", "lax"):
        raise ValueError(f"unknown depthwise conv impl {impl!r}; use 'auto', 'shifted' or 'lax'")
    return impl
