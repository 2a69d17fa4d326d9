"""Which rows of the global batch each host reads, and host-local batches → global, batch-sharded jax.Arrays."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agentlm_jax.config import DEFAULT_RULES, Rules
from agentlm_jax.sharding import axes_size, batch_axes, batch_sharding, batch_shards


def host_data_shard(mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    devices: Sequence[jax.Device] | None = None) -> tuple[int, int]:
    """(index, count): this process's devices hold block `index` of the global batch cut into `count` blocks.

    Pass it to `train_iterator`/`ValidationSet` (or give them `mesh=`). On the usual meshes, whose batch axes
    (`data`, `fsdp`) span the hosts, it is (process_index, process_count). When hosts hold replicas of the
    same rows (a batch axis inside each host and e.g. `tensor` across hosts), replica hosts get the same
    block, so they read the same records, as `jax.make_array_from_process_local_data` requires.
    `devices` stands for the process's devices (tests).
    """
    axes = batch_axes(rules)
    num_blocks = axes_size(mesh, axes)
    block_of = NamedSharding(mesh, PartitionSpec(axes or None)).devices_indices_map((num_blocks,))
    if devices is None:
        devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    held = sorted({block_of[d][0].start or 0 for d in devices})
    if held != list(range(held[0], held[0] + len(held))) or held[0] % len(held):
        raise ValueError(f"this process's devices hold batch blocks {held} of {num_blocks} (mesh axes {axes}), "
                         "not one aligned run; order the mesh so each host's devices are contiguous along them")
    return held[0] // len(held), num_blocks // len(held)


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                         rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Host-local [host_batch, T] arrays -> global [global_batch, T] jax.Arrays whose batch axis is sharded
    like the logical `batch` axis (and `seq` like `seq`) under `rules`. The host batch must come from an
    iterator made with the same mesh (or the same `host_data_shard`)."""
    sharding = batch_sharding(mesh, rules)
    axes, shards = batch_axes(rules), batch_shards(mesh, rules)
    _, blocks = host_data_shard(mesh, rules)
    out = {}
    for key, local in batch.items():
        global_shape = (local.shape[0] * blocks,) + local.shape[1:]
        if global_shape[0] % shards:
            raise ValueError(f"global batch {global_shape[0]} cannot be split over the {shards} devices of "
                             f"mesh axes {axes}; make the global batch a multiple of {shards}")
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
