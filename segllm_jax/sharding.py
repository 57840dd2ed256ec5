"""Logical axis names -> mesh axes: the ONLY module that knows about the device mesh.

Models tag each parameter dimension with a logical name (``layers.param``). Here one table maps
those names onto the three mesh axes ``data`` (pure data parallelism), ``fsdp`` (data
parallelism with parameters, gradients and optimizer state sharded) and ``tensor`` (tensor
parallelism inside layers). Change the table, not the models, to try another layout.

Two rules keep every spec valid on any mesh: a mesh axis is used at most once per parameter
(first dimension wins), and a dimension whose size the mesh axes do not divide is replicated
(this is what keeps HIPIE's odd sizes, e.g. 169 dynamic-conv parameters, legal).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segllm_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    # LLaMA
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    # CLIP vision tower and projector input
    "vision_embed": "fsdp",
    "vision_mlp": "tensor",
    "vision_heads": "tensor",
    "patch": None,
    "position": None,
    # HIPIE (57 M parameters: replicated by default, fsdp over its wider matrices)
    "hipie_embed": None,
    "hipie_mlp": "fsdp",
    "hipie_heads": None,
    "hipie_text": None,
    "conv_in": None,
    "conv_out": "fsdp",
    "conv_kernel": None,
    "norm": None,
}


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; ``shape`` as a dict or a 3-tuple, -1 for 'the rest'."""
    sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
    devices = list(devices if devices is not None else jax.devices())
    if len(sizes) != 3:
        raise ConfigError(f"mesh shape {sizes} must name the three axes {MESH_AXES}.")
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh shape {sizes} may use -1 for one axis only.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"mesh shape {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
                          f"{len(devices)} are available.")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axis names."""
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(axes, shape, strict=False):  # dimensions without a name stay replicated
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_AXIS_RULES.")
        target = rules[name]
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        n = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % n:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """A pytree of ``NamedSharding`` matching ``state`` (concrete or abstract), from logical axes."""

    def one(var: nnx.Variable) -> NamedSharding:
        value = var.get_value() if hasattr(var, "get_value") else var.value
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every variable of ``module`` on ``mesh`` according to its logical axes (in place)."""
    graphdef, state = nnx.split(module)
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda v, s: v.replace(jax.device_put(v[...], s)), state, shardings,
                         is_leaf=_is_variable)
    nnx.update(module, state)
    return module
