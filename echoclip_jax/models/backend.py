"""The one place where the models' backend-specific choices are made, for the platform (and mesh) a
program is compiled for.

That platform is the one of the mesh the program is jitted over, which need not be this process's
default backend: `python -m echoclip_jax.aot` traces on a CPU host for a TPU topology, and a choice read
from `jax.default_backend()` there would compile CPU workarounds into a TPU program (e.g. 49 shifted
multiply-adds per depthwise convolution instead of one grouped convolution). So the models never read
the backend themselves: they ask this module, and whoever jits a program for a mesh wraps the traced
function in `for_mesh(mesh, fn)` (train.build_train_step does). Outside such a scope (eager calls, or a
program jitted over the local devices without naming them) the default backend is used.

The choices, each with the measurement behind it in BENCHMARKS.md:
- `depthwise_impl(impl, positions)`: "auto" -> "lax" (one grouped convolution) on GPU/TPU; on CPU
  "matmul" up to MATMUL_MAX_POSITIONS positions, "shifted" above (see depthwise_conv.py).
- `mean_as_product()`: LayerNorm statistics as a product with a 1/C column on CPU only (layers.py).

The mesh of the scope also places activations and weights where FSDP wants them (visible in the TPU
step that echoclip_jax.aot compiles; BENCHMARKS.md):
- `constrain_batch(x)`: activations split over the mesh's batch axes at the towers' block boundaries.
  Without it GSPMD lets the FSDP-sharded "embed" axis of the token embedding decide the text tower's
  layout: every device runs the whole global batch through the text tower with the width split.
- `batch_local(fn, x, *weights)`: fn on each device's rows of x with the weights whole (shard_map).
  ConvNeXt's depthwise kernels are sharded over their channels at rest, and GSPMD would otherwise move the
  activations to channel sharding for each depthwise convolution (two all-to-alls forward, two backward,
  per block) rather than gather 7x7xC weights; a sharding constraint on the kernel alone does not prevent
  it everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from echoclip_jax.runtime.sharding import BATCH_AXES

DEPTHWISE_IMPLS = ("auto", "shifted", "matmul", "lax")
# "auto" on CPU takes the matmul form up to this many positions (8x8): there it avoids the shifted form's
# materialised copies (the tiny config's 8x8, 4x4 and 2x2 stages, 10 of its 12 blocks). Larger maps pay
# for its extra multiply-adds (at 16x16, 4x the shifted form's), so they stay shifted (BENCHMARKS.md).
MATMUL_MAX_POSITIONS = 64
PLATFORMS = ("cpu", "gpu", "tpu")

_TARGET = contextvars.ContextVar("echoclip_jax_target", default=(None, None))  # (platform, mesh or None)


def _normalise(name: str) -> str:
    name = name.lower()
    name = "gpu" if name in ("cuda", "rocm") else name
    if name not in PLATFORMS:
        raise ValueError(f"platform {name!r}: expected one of {', '.join(PLATFORMS)}")
    return name


def mesh_platform(mesh) -> str:
    """The platform of a concrete mesh's devices ("cpu", "gpu" or "tpu"; compile-only devices included)."""
    names = {_normalise(d.platform) for d in mesh.devices.flat}
    if len(names) != 1:
        raise ValueError(f"a mesh must hold devices of one platform, got {sorted(names)}")
    return names.pop()


@contextlib.contextmanager
def target(mesh_or_platform):
    """Within this scope the models trace for `mesh_or_platform` (a Mesh or a platform name)."""
    if isinstance(mesh_or_platform, str):
        name, mesh = _normalise(mesh_or_platform), None
    else:
        name, mesh = mesh_platform(mesh_or_platform), mesh_or_platform
    token = _TARGET.set((name, mesh))
    try:
        yield name
    finally:
        _TARGET.reset(token)


def for_mesh(mesh, fn):
    """`fn`, traced for `mesh`'s platform: wrap a function before jitting it over that mesh."""
    mesh_platform(mesh)  # fails now, not at trace time, on a mixed mesh

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with target(mesh):
            return fn(*args, **kwargs)

    return wrapped


def platform() -> str:
    """The platform being traced for: the innermost `target` scope, else jax.default_backend()."""
    return _TARGET.get()[0] or _normalise(jax.default_backend())


def depthwise_impl(impl: str, positions: int) -> str:
    """Depthwise convolution implementation for a feature map of `positions` (H*W); "auto" resolved here."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(
            f"unknown depthwise conv impl {impl!r} (model.vision.depthwise_impl): use one of "
            f"{', '.join(DEPTHWISE_IMPLS)}"
        )
    if impl != "auto":
        return impl
    if platform() != "cpu":
        return "lax"
    return "matmul" if positions <= MATMUL_MAX_POSITIONS else "shifted"


def mean_as_product() -> bool:
    """LayerNorm means as a product with a 1/C column (CPU only: XLA:CPU's reduction fusions materialise
    their producers); other backends fuse reductions well and keep `mean`."""
    return platform() == "cpu"


def _batch_axes(mesh, rows: int) -> tuple:
    """The mesh's batch axes of size > 1, if together they divide `rows`; () otherwise or without a mesh."""
    if mesh is None:
        return ()
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return axes if axes and rows % n == 0 else ()


def constrain_batch(x):
    """x with its leading (batch) axis split over the scope's mesh batch axes, the other axes left to
    GSPMD (e.g. "heads" over "tensor"); unchanged outside a mesh scope or when the mesh cannot split it."""
    mesh = _TARGET.get()[1]
    axes = _batch_axes(mesh, x.shape[0])
    if not axes:
        return x
    spec = P(axes, *([P.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_local(fn, x, *weights):
    """fn(x, *weights) computed on each device's rows of x with every weight whole on every device
    (jax.shard_map over the scope's batch axes; the weights' gradients are summed over them). Outside a
    mesh scope, or when the mesh cannot split x's rows, it is fn(x, *weights)."""
    mesh = _TARGET.get()[1]
    axes = _batch_axes(mesh, x.shape[0])
    if not axes:
        return fn(x, *weights)
    spec = P(axes)

    def local(rows, *whole):
        # The weights enter invariant (replicated); cast them to varying over the batch axes so that a custom
        # VJP inside `fn` (the depthwise kernels') may return per-device weight gradients: the cast's
        # transpose sums them over the batch axes, which is the weights' gradient.
        return fn(rows, *(jax.lax.pcast(w, axes, to="varying") for w in whole))

    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) + (P(),) * len(weights), out_specs=spec)(x, *weights)
