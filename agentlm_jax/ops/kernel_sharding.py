"""Running an attention kernel over the mesh: each device calls it on its own rows and heads (`shard_map`).

Kernels (Pallas) see one device's arrays. The batch is split like the rules' logical `batch` axis and the heads
like `act_heads`, when those mesh axes divide both the query and the key/value head counts (else the heads
stay whole on every device), so the rules table decides the layout here as everywhere.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

from agentlm_jax.config import Rules
from agentlm_jax.sharding import axes_size, batch_axes, mesh_axes_of


def head_axes(mesh: Mesh, rules: Rules, num_heads: int, num_kv_heads: int) -> tuple[str, ...]:
    """The mesh axes the heads are split over: the rules' `act_heads`, if they divide both head counts."""
    axes = tuple(a for a in mesh_axes_of("act_heads", rules) if a not in batch_axes(rules))
    shards = axes_size(mesh, axes)
    return axes if num_heads % shards == 0 and num_kv_heads % shards == 0 else ()


def run_sharded(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, mesh: Mesh,
                rules: Rules, heads: tuple[str, ...], head_axis: int, leading: Sequence[Any] = (),
                leading_specs: Sequence[Any] = ()) -> jax.Array:
    """fn(*leading, q, k, v, segment_ids) on every device's rows and heads (heads on axis `head_axis` of q, k,
    v and of the output; the batch on axis 0 of all of them); `leading` are extra arguments with their specs."""
    rows = tuple(a for a in batch_axes(rules) if a not in heads)
    spec = [None] * q.ndim
    spec[0], spec[head_axis] = rows or None, heads or None
    spec = PartitionSpec(*spec)
    return jax.shard_map(fn, mesh=mesh, check_vma=False,
                         in_specs=(*leading_specs, spec, spec, spec, PartitionSpec(rows or None, None)),
                         out_specs=spec)(*leading, q, k, v, segment_ids)
