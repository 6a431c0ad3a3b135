"""Device mesh and the logical-axis rules that place parameters and activations on it.

Parameters carry logical axis names ("embed", "mlp", "heads", "kv", "vocab", "joint", None).
A preset maps those names to the mesh axes ("data", "fsdp", "tensor"); a dimension whose size the mesh
axis does not divide is replicated instead, so one rule set works for every model size and device count.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The global batch is split over every data-like axis; the tensor axis sees the whole batch.
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or None = replicated). "batch" is the activation batch dimension.
RULES = {
    "dp": {"batch": BATCH_AXES},
    "fsdp": {"batch": BATCH_AXES, "embed": "fsdp"},
    "fsdp_tp": {"batch": BATCH_AXES, "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "vocab": "tensor"},
}


def build_mesh(mesh_config, devices=None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh from config.mesh; one size may be -1 (all remaining devices).

    Axis types are Auto (GSPMD propagation under jit with explicit in/out shardings); jax 0.10's
    make_mesh would otherwise default to Explicit sharding-in-types.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of "
            f"{len(devices)} devices; set one axis to -1 or make the product match"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def get_rules(preset: str) -> dict:
    if preset not in RULES:
        raise ValueError(f"sharding_preset {preset!r}: expected one of {sorted(RULES)}")
    return RULES[preset]


def logical_to_spec(names, shape, mesh: Mesh, rules: dict) -> P:
    """PartitionSpec for one array: each logical name mapped by `rules`, replicated where it cannot be.

    A dim falls back to replication when its size is not divisible by the mesh axes, or when those
    mesh axes are already used by an earlier dim of the same array.
    """
    if not names:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match shape {shape}")
    used, out = set(), []
    for name, size in zip(names, shape):
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in axes)
        if not axes or used & set(axes) or size % n:
            out.append(None)
        else:
            used |= set(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _names(variable) -> tuple | None:
    meta = variable.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def param_shardings(params_state, mesh: Mesh, rules: dict):
    """NamedShardings for an nnx.State of Params, as a pure dict matching `nnx.to_pure_dict`."""

    def one(v):
        return NamedSharding(mesh, logical_to_spec(_names(v), np.shape(v.get_value()), mesh, rules))

    tree = jax.tree.map(one, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def like_params(tree, params, param_sharding, mesh: Mesh):
    """Shardings for a tree (e.g. optimizer state) whose subtrees mirror `params`: a leaf gets the
    sharding of the parameter at the longest matching path suffix with the same shape, else replicated.
    """
    by_path = {}
    for path, leaf in jax.tree.leaves_with_path(params):
        by_path[tuple(str(k) for k in path)] = (np.shape(leaf), None)
    for path, sh in jax.tree.leaves_with_path(param_sharding):
        key = tuple(str(k) for k in path)
        by_path[key] = (by_path[key][0], sh)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        key = tuple(str(k) for k in path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit and hit[0] == np.shape(leaf):
                return hit[1]
        return replicated

    return jax.tree.map_with_path(pick, tree)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
