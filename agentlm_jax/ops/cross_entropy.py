"""Next-token cross-entropy from the final hidden states and the output head, three ways, one formula (nll.py).

  full            the whole [B,T,V] float32 logits at once (fastest for small vocabularies and batches).
  chunked         `chunk_size` positions at a time: only [B,chunk,V] logits ever exist. Given the loss mask,
                  only the loss positions are computed: they are gathered to the front and only the chunks
                  holding them run (most positions of SFT data carry no loss). On CPU the loop over chunks is
                  ops/cpu/cross_entropy.py's; elsewhere a rematerialised `lax.scan` with a `lax.cond` per chunk.
  vocab_parallel  a `shard_map` over the mesh: each shard of the vocabulary's mesh axes (the rules' `vocab`)
                  multiplies h by its own slice W[:, v0:v1] and gets logits for its vocabulary slice only. The
                  row maximum (`pmax`), the sum of exponentials and the target's logit (each `psum`) are
                  combined across those axes; the full-vocabulary logits are never gathered. Chunked (and
                  masked) as well when chunk_size is set.

All give the same values; they differ in memory and speed. The reduction to a loss is training/loss.py's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from agentlm_jax.config.schema import Rules
from agentlm_jax.ops.cpu import cross_entropy as cpu_cross_entropy
from agentlm_jax.ops.nll import block_nll
from agentlm_jax.ops.backend import cross_entropy_impl, current_platform
from agentlm_jax.sharding import axes_size, batch_axes, batch_shards, constrain, vocab_axes


def resolve_impl(impl: str, chunk_size: int | None, seq_len: int, mesh: Mesh, rules: Rules) -> str:
    """The loss implementation `impl="auto"` stands for (config.LossConfig) on this mesh: the one place."""
    if impl != "auto":
        return impl
    if axes_size(mesh, vocab_axes(rules)) > 1:
        return "vocab_parallel"
    return "chunked" if chunk_size and chunk_size < seq_len else "full"


def token_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, impl: str = "full",
              chunk_size: int | None = None, mesh: Mesh | None = None, rules: Rules | None = None,
              mask: jax.Array | None = None) -> jax.Array:
    """Float32 negative log-likelihood [B,T] of `targets` [B,T] under logits hidden [B,T,D] @ kernel [D,V].

    `impl` is "full", "chunked" or "vocab_parallel" (resolved: see `resolve_impl`; vocab_parallel needs `mesh`
    and `rules`, and chunked uses them to keep each device's rows on it). The matmul runs in hidden's dtype,
    accumulating in float32. `mask` [B,T] (e.g. the loss mask): only the positions where mask > 0 are wanted;
    `chunked` and `vocab_parallel` then compute only those (0 elsewhere) and skip the chunks without any.
    """
    if impl == "full":
        return block_nll(hidden, kernel, targets, 0, None)
    if impl == "chunked":
        groups = 1 if mesh is None or rules is None else batch_shards(mesh, rules)
        return _chunked_nll(hidden, kernel, targets, 0, None, chunk_size, mask, groups)
    if impl != "vocab_parallel":
        raise ValueError(f"unknown loss impl {impl!r}")
    if mesh is None or rules is None:
        raise ValueError("the vocab_parallel loss needs the mesh and the sharding rules")
    return vocab_parallel_nll(hidden, kernel, targets, mesh=mesh, rules=rules, chunk_size=chunk_size, mask=mask)


def _chunked_nll(h, kernel, targets, vocab_start, axis_name, chunk_size: int | None,
                 mask: jax.Array | None = None, groups: int = 1) -> jax.Array:
    """`block_nll` over the sequence in chunks of `chunk_size` positions (rematerialised), or at once.

    With a `mask` [B,T], only the positions where mask > 0 are computed (the others are 0), and the chunks
    holding none of them are skipped: the rows are cut into `groups` groups (one per device holding a share
    of the batch, so nothing moves between devices); within a group the needed positions are moved to the
    front, in order, and the group is processed chunk_size × rows-per-group positions at a time; a chunk after
    the group's last needed position costs nothing (no matmul, forward or backward). In SFT data most
    positions carry no loss (prompts, tool output, padding), so most vocabulary-sized matmuls are skipped.
    """
    B, T, D = h.shape
    if not chunk_size or chunk_size >= T:
        if mask is None:
            return block_nll(h, kernel, targets, vocab_start, axis_name)
        chunk_size = T
    if T % chunk_size:
        raise ValueError(f"loss chunk_size {chunk_size} does not divide the sequence length {T}")
    n = T // chunk_size
    on_cpu = cross_entropy_impl(current_platform()) == "cpu_fused"
    if mask is None:  # plain chunks: [B, chunk_size] positions each
        groups, h_g, t_g = B, h, targets
    else:
        groups = groups if B % groups == 0 else 1
        needed = mask.reshape(groups, B // groups * T) > 0
        order = jnp.argsort(~needed, axis=1, stable=True)  # needed positions first, in sequence order
        inverse = jnp.argsort(order, axis=1)
        h_flat = h.reshape(groups, -1, D)
        h_g = (cpu_cross_entropy.permute(h_flat, order, inverse) if on_cpu
               else jnp.take_along_axis(h_flat, order[..., None], axis=1))
        t_g = jnp.take_along_axis(targets.reshape(groups, -1), order, axis=1)
        if groups > 1:  # keep each group on its devices
            h_g, t_g = constrain(h_g, ("batch", None, None)), constrain(t_g, ("batch", None))
        width = B // groups * chunk_size
        chunks_needed = (jnp.max(jnp.sum(needed, axis=1, dtype=jnp.int32)) + width - 1) // width

    def split(x):  # [G, n*W, ...] -> [n, G, W, ...]
        return x.reshape(groups, n, -1, *x.shape[2:]).swapaxes(0, 1)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def chunk(_, xs):
        i, h_c, t_c = xs
        if mask is None:
            return None, block_nll(h_c, kernel, t_c, vocab_start, axis_name)
        return None, jax.lax.cond(i < chunks_needed,
                                  lambda: block_nll(h_c, kernel, t_c, vocab_start, axis_name),
                                  lambda: jnp.zeros_like(t_c, jnp.float32))

    if mask is not None and axis_name is None and on_cpu:  # only the first chunks_needed chunks, fwd and bwd
        weights = jnp.arange(h_g.shape[1]) < jnp.sum(needed, axis=1, dtype=jnp.int32)[:, None]  # [G, n*W]
        nll = cpu_cross_entropy.first_chunks_nll(split(h_g), kernel, split(t_g), split(weights), chunks_needed)
    else:
        _, nll = jax.lax.scan(chunk, None, (jnp.arange(n), split(h_g), split(t_g)))
    nll = nll.swapaxes(0, 1).reshape(groups, -1)
    if mask is None:
        return nll.reshape(B, T)
    nll = jnp.take_along_axis(nll, inverse, axis=1).reshape(B, T)
    return jnp.where(mask > 0, nll, 0.0)


def vocab_parallel_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, mesh: Mesh, rules: Rules,
                       chunk_size: int | None = None, mask: jax.Array | None = None) -> jax.Array:
    """`token_nll` with the vocabulary split over the mesh axes of the rules' `vocab` (see the module doc)."""
    vocab_mesh_axes = vocab_axes(rules)
    if not vocab_mesh_axes:
        raise ValueError("the vocab_parallel loss needs the vocabulary split over a mesh axis, but mesh.rules map "
                         "'vocab' to none besides the batch's; use loss.impl=full or chunked")
    axis = vocab_mesh_axes[0] if len(vocab_mesh_axes) == 1 else vocab_mesh_axes
    vocab, shards = kernel.shape[-1], axes_size(mesh, vocab_mesh_axes)
    if vocab % shards:
        raise ValueError(f"vocab_parallel loss: vocabulary {vocab} is not divisible by the {shards} devices of mesh "
                         f"axes {vocab_mesh_axes}")
    axes = tuple(a for a in batch_axes(rules) if a not in vocab_mesh_axes)
    rows = PartitionSpec(axes or None)

    def per_shard(h, w, t, m):
        vocab_start = jax.lax.axis_index(axis) * w.shape[-1]
        if m is not None and axes:
            # Each batch shard skips its own chunks, so the head must not be summed over the batch shards
            # inside a skipped chunk: mark it varying here, so its gradient's psum happens once, outside.
            # (The vocabulary shards of a row all skip the same chunks, so their psums inside always meet.)
            w = jax.lax.pcast(w, axes, to="varying")
        return _chunked_nll(h, w, t, vocab_start, axis, chunk_size, m)

    head = PartitionSpec(None, axis)
    if mask is None:
        return jax.shard_map(lambda h, w, t: per_shard(h, w, t, None), mesh=mesh, out_specs=rows,
                             in_specs=(rows, head, rows))(hidden, kernel, targets)
    return jax.shard_map(per_shard, mesh=mesh, out_specs=rows,
                         in_specs=(rows, head, rows, rows))(hidden, kernel, targets, mask)
