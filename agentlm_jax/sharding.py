"""Logical axis names → mesh axes, the MaxText way.

Every parameter and activation is annotated with logical axis names (`embed`, `mlp`, `heads`, ...).
One table of rules (`MeshConfig.rules`, defaults in `config.DEFAULT_RULES`) maps each logical name to mesh
axes, so a new parallelism layout is a config change, not a code change. Everything that needs to know where
the batch or the vocabulary lives asks this module (`batch_axes`, `batch_sharding`, `vocab_axes`), which asks
the rules.

Mesh axes (`config.MESH_AXES`):
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor (model) parallelism over heads, MLP width and vocabulary
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agentlm_jax.config.schema import DEFAULT_RULES, MESH_AXES, MeshConfig, Rules
from agentlm_jax.errors import ConfigError

def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices the devices span (multislice: slices joined by the data-center network, DCN)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices (or the given ones).

    On several slices the data axis spans them: each slice holds data/slices of its replicas with fsdp and
    tensor inside the slice (fast ICI), so only the gradient reduction of data parallelism crosses the DCN."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    # Auto axes: XLA propagates shardings from the parameters and the `constrain` hints (the MaxText way),
    # rather than JAX's explicit sharding-in-types mode, which `jax.make_mesh` now defaults to.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    slices = num_slices(devices)
    if slices > 1:
        data, fsdp, tensor = shape
        if data % slices:
            raise ConfigError(f"the {len(devices)} devices span {slices} slices: mesh.data ({data}) must be a "
                              f"multiple of {slices}, so that only data parallelism crosses the network between "
                              f"slices; e.g. mesh.data={slices} mesh.fsdp=-1")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_to_pspec(logical_axes: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once."""
    if logical_axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def mesh_axes_of(logical_name: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes a logical axis name maps to under `rules` (empty: replicated)."""
    axes = dict(rules).get(logical_name)
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes the batch is split over (the logical `batch` axis)."""
    return mesh_axes_of("batch", rules)


def vocab_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes the output head's vocabulary is split over (the logical `vocab` axis), minus the batch's."""
    return tuple(a for a in mesh_axes_of("vocab", rules) if a not in batch_axes(rules))


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """Into how many pieces the batch is split across the mesh."""
    return axes_size(mesh, batch_axes(rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """The sharding of a [batch, seq] array of the train step's batch."""
    return NamedSharding(mesh, logical_to_pspec(("batch", "seq"), rules))


def logical_sharding(logical_axes: Sequence[str | None] | None, mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_pspec(logical_axes, rules))


log = logging.getLogger(__name__)


def fit_pspec(pspec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str = "array") -> PartitionSpec:
    """`pspec` without the mesh axes that do not divide their dimension (that dimension is then replicated
    over them), so e.g. 2 KV heads still work with tensor=4. Logged, since it costs memory."""
    out = []
    for dim, (size, axes) in enumerate(zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec)))):
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for ax in axes_t:
            if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[ax]) == 0:
                kept.append(ax)
            else:
                log.info("%s: dimension %d (size %d) is not divisible by mesh axis %r (size %d); "
                         "replicating it over that axis", what, dim, size, ax, mesh.shape[ax])
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was annotated with (`out_sharding` metadata), or None."""
    return variable.get_metadata().get("out_sharding") or None


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A tree matching `state` (an nnx.State of arrays or of ShapeDtypeStructs, e.g. from `nnx.eval_shape`)
    whose values are NamedShardings derived from each variable's logical axis names by `rules`.

    Variables without logical axes (and plain arrays, e.g. a step counter) are replicated. Usable directly as
    `jax.jit(..., out_shardings=...)` or with `jax.device_put(state, shardings)`.
    """
    rules = tuple(rules)

    def sharding_of(path, x):
        what = jax.tree_util.keystr(path)
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            pspec = logical_to_pspec(variable_logical_axes(x), rules)
            if hasattr(value, "shape"):
                pspec = fit_pspec(pspec, value.shape, mesh, what)
            return x.replace(NamedSharding(mesh, pspec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------- activation constraints
@dataclasses.dataclass(frozen=True)
class _Active:
    mesh: Mesh
    rules: Rules


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("agentlm_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """Within this context (while tracing), `constrain` pins activations to the mesh by the rules."""
    token = _ACTIVE.set(_Active(mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; the identity outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, active.mesh, active.rules))


def active_mesh() -> Mesh | None:
    active = _ACTIVE.get()
    return active.mesh if active else None


def active_rules() -> Rules | None:
    active = _ACTIVE.get()
    return active.rules if active else None
