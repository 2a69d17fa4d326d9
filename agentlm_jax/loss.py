"""Next-token cross-entropy from the final hidden states and the output head, three ways, one formula.

Every variant computes, per position, nll = logsumexp(logits) - logits[target] with logits = h @ W (float32
accumulation), where h [B,T,D] are `Llama.hidden_states` and W [D,V] is `lm_head.kernel`:

  full            the whole [B,T,V] float32 logits at once (fastest for small vocabularies and batches).
  chunked         `chunk_size` positions at a time: only [B,chunk,V] logits ever exist. Given the loss mask,
                  only the loss positions are computed: they are gathered to the front and only the chunks
                  holding them run (most positions of SFT data carry no loss). With one vocabulary shard, a
                  `fori_loop` over exactly those chunks with a custom VJP that also computes each chunk's
                  gradients in the forward pass (fused linear cross-entropy; the backward pass recomputes the
                  logits only for a cotangent that is not a constant times the loss mask); else a
                  rematerialised `lax.scan` with a `lax.cond` per chunk.
  vocab_parallel  a `shard_map` over the mesh: each `tensor` shard multiplies h by its own slice W[:, v0:v1]
                  and gets logits for its vocabulary slice only. The row maximum (`pmax`), the sum of
                  exponentials and the target's logit (each `psum`) are combined across `tensor`; the
                  full-vocabulary logits are never gathered. Chunked (and masked) as well when chunk_size is
                  set.

The reductions to a loss (token-level mean over the loss tokens of the global batch) are in `loss_sums`;
the train step divides Σ nll·mask of each micro-batch by the global batch's loss-token count.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from agentlm_jax.sharding import Rules, constrain, logical_to_pspec

TENSOR_AXIS = "tensor"


def resolve_impl(impl: str, chunk_size: int | None, seq_len: int, tensor_parallel: int) -> str:
    """The loss implementation `impl="auto"` stands for (see config.LossConfig)."""
    if impl != "auto":
        return impl
    if tensor_parallel > 1:
        return "vocab_parallel"
    return "chunked" if chunk_size and chunk_size < seq_len else "full"


def _logits(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """Float32 logits [B,C,v] of h [B,C,D] against a (slice of the) output head kernel [D,v]."""
    return jnp.einsum("BCD,DV->BCV", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)


def _is_target(logits: jax.Array, targets: jax.Array, vocab_start: jax.Array | int = 0) -> jax.Array:
    """[B,C,v] bool: the target's column of a vocabulary slice that starts at `vocab_start`."""
    return jnp.arange(logits.shape[-1]) == (targets - vocab_start)[..., None]


def _nll_and_lse(logits: jax.Array, targets: jax.Array, vocab_start: jax.Array | int,
                 axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """(nll, log-sum-exp), each [B,C], of logits [B,C,v] of the vocabulary slice that starts at `vocab_start`.

    With `axis_name`, the slices of the shards along that mesh axis together form the vocabulary, and the
    per-row statistics are combined across them.
    """
    # The shift only keeps exp() in range; logsumexp's value and gradient do not depend on it.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    if axis_name:
        row_max = jax.lax.pmax(row_max, axis_name)
    sum_exp = jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1)
    # The target's logit as a masked sum over the vocabulary (0 when the target is in another shard's slice):
    # fused with the logits, and its gradient is dense; a gather's gradient is a scatter (slow on CPU).
    target_logit = jnp.sum(jnp.where(_is_target(logits, targets, vocab_start), logits, 0.0), axis=-1)
    if axis_name:
        sum_exp = jax.lax.psum(sum_exp, axis_name)
        target_logit = jax.lax.psum(target_logit, axis_name)
    lse = jnp.log(sum_exp) + row_max
    return lse - target_logit, lse


def _block_nll(h: jax.Array, kernel: jax.Array, targets: jax.Array, vocab_start: jax.Array | int,
               axis_name: str | None) -> jax.Array:
    """nll [B,C] of h [B,C,D] against the vocabulary slice kernel [D,v] that starts at `vocab_start`."""
    return _nll_and_lse(_logits(h, kernel), targets, vocab_start, axis_name)[0]


def _chunked_nll(h, kernel, targets, vocab_start, axis_name, chunk_size: int | None,
                 mask: jax.Array | None = None, groups: int = 1) -> jax.Array:
    """`_block_nll` over the sequence in chunks of `chunk_size` positions (rematerialised), or at once.

    With a `mask` [B,T], only the positions where mask > 0 are computed (the others are 0), and the chunks
    holding none of them are skipped: the rows are cut into `groups` groups (one per device holding a share
    of the batch, so nothing moves between devices); within a group the needed positions are moved to the
    front, in order, and the group is processed chunk_size × rows-per-group positions at a time; a chunk after
    the group's last needed position costs nothing (`lax.cond`: no matmul, forward or backward). In SFT data
    most positions carry no loss (prompts, tool output, padding), so most vocabulary-sized matmuls are skipped.
    """
    B, T, D = h.shape
    if not chunk_size or chunk_size >= T:
        if mask is None:
            return _block_nll(h, kernel, targets, vocab_start, axis_name)
        chunk_size = T
    if T % chunk_size:
        raise ValueError(f"loss chunk_size {chunk_size} does not divide the sequence length {T}")
    n = T // chunk_size
    if mask is None:  # plain chunks: [B, chunk_size] positions each
        groups, h_g, t_g = B, h, targets
    else:
        groups = groups if B % groups == 0 else 1
        needed = mask.reshape(groups, B // groups * T) > 0
        order = jnp.argsort(~needed, axis=1, stable=True)  # needed positions first, in sequence order
        inverse = jnp.argsort(order, axis=1)
        h_g = _permute(h.reshape(groups, -1, D), order, inverse)
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
            return None, _block_nll(h_c, kernel, t_c, vocab_start, axis_name)
        return None, jax.lax.cond(i < chunks_needed,
                                  lambda: _block_nll(h_c, kernel, t_c, vocab_start, axis_name),
                                  lambda: jnp.zeros_like(t_c, jnp.float32))

    if mask is not None and axis_name is None:  # only the first chunks_needed chunks, forward and backward
        weights = jnp.arange(h_g.shape[1]) < jnp.sum(needed, axis=1, dtype=jnp.int32)[:, None]  # [G, n*W]
        nll = _first_chunks_nll(split(h_g), kernel, split(t_g), split(weights), chunks_needed)
    else:
        _, nll = jax.lax.scan(chunk, None, (jnp.arange(n), split(h_g), split(t_g)))
    nll = nll.swapaxes(0, 1).reshape(groups, -1)
    if mask is None:
        return nll.reshape(B, T)
    nll = jnp.take_along_axis(nll, inverse, axis=1).reshape(B, T)
    return jnp.where(mask > 0, nll, 0.0)


@jax.custom_vjp
def _first_chunks_nll(h: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array,
                      count: jax.Array) -> jax.Array:
    """nll [n,G,W] of the first `count` (traced) chunks of h [n,G,W,D] against the whole vocabulary kernel
    [D,V]; 0 in the other chunks, which cost nothing. A `fori_loop` over exactly the needed chunks (a scan with
    a `lax.cond` per chunk would still add a zero [D,V] kernel gradient for every skipped chunk).

    `weights` [n,G,W] (bool) marks the positions whose nll is wanted. Under differentiation the forward pass
    also computes the gradient of Σ weights·nll (fused linear cross-entropy: each chunk's softmax is turned
    into its h and kernel gradients while its logits exist), so the backward pass only scales it: one [C,V]
    matmul fewer per chunk than recomputing the logits. That holds whenever the cotangent is a constant times
    `weights` (any loss that sums or averages the wanted positions: the train step's); any other cotangent
    takes the general backward pass, which recomputes each chunk's logits from the saved log-sum-exp."""
    return _chunk_loop(h, kernel, targets, weights, count, with_grads=False)[0]


def _blocks(x: jax.Array, start, k: int) -> jax.Array:
    """Chunks start … start+k-1 of x [n,G,W,...] side by side: [G,k·W,...]."""
    x = jax.lax.dynamic_slice_in_dim(x, start, k, axis=0)
    return x.swapaxes(0, 1).reshape(x.shape[1], k * x.shape[2], *x.shape[3:])


def _set_blocks(x: jax.Array, start, k: int, value: jax.Array) -> jax.Array:
    """The inverse of `_blocks`: x [n,G,W,...] with chunks start … start+k-1 set from value [G,k·W,...]."""
    value = value.reshape(x.shape[1], k, x.shape[2], *x.shape[3:]).swapaxes(0, 1)
    return jax.lax.dynamic_update_slice_in_dim(x, value.astype(x.dtype), start, axis=0)


def _over_chunks(count, block, carry, n: int):
    """block(start, k, carry) over the first `count` of n chunks, two at a time (one matmul over 2·W positions:
    at seq 2048 with one row per step, chunks of 128 positions made small, slow matmuls), then the odd one."""
    if n < 2:
        return jax.lax.fori_loop(0, count, lambda i, c: block(i, 1, c), carry)
    pairs = count // 2
    carry = jax.lax.fori_loop(0, pairs, lambda j, c: block(2 * j, 2, c), carry)
    return jax.lax.fori_loop(2 * pairs, count, lambda i, c: block(i, 1, c), carry)


def _head_grads(h_c, kernel, d_logits):
    """(dh [G,C,D], dkernel [D,V]) of a chunk from its logits' cotangent d_logits [G,C,V] (float32)."""
    dh = jnp.einsum("GWV,DV->GWD", d_logits, kernel.astype(jnp.float32), preferred_element_type=jnp.float32)
    dkernel = jnp.einsum("GWD,GWV->DV", h_c.astype(jnp.float32), d_logits, preferred_element_type=jnp.float32)
    return dh, dkernel


def _softmax_minus_onehot(logits, lse, targets):
    """∂nll/∂logits [G,C,V] of each position: softmax(logits) − onehot(target)."""
    return jnp.exp(logits - lse[..., None]) - _is_target(logits, targets)


def _chunk_loop(h, kernel, targets, weights, count, with_grads: bool):
    """(nll, lse) [n,G,W] of the first `count` chunks; `with_grads`: also (dh [n,G,W,D], dkernel [D,V]),
    the gradient of Σ weights·nll."""
    def block(i, k, carry):
        nll, lse, *grads = carry
        h_c, t_c = _blocks(h, i, k), _blocks(targets, i, k)
        logits = _logits(h_c, kernel)
        nll_i, lse_i = _nll_and_lse(logits, t_c, 0, None)
        nll, lse = _set_blocks(nll, i, k, nll_i), _set_blocks(lse, i, k, lse_i)
        if not with_grads:
            return nll, lse
        d_logits = jnp.where(_blocks(weights, i, k)[..., None], _softmax_minus_onehot(logits, lse_i, t_c), 0.0)
        dh_i, dkernel_i = _head_grads(h_c, kernel, d_logits)
        dh, dkernel = grads
        return nll, lse, _set_blocks(dh, i, k, dh_i), dkernel + dkernel_i

    zeros = jnp.zeros(targets.shape, jnp.float32)
    carry = (zeros, zeros)
    if with_grads:
        carry += (jnp.zeros(h.shape, jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    return _over_chunks(count, block, carry, h.shape[0])


def _first_chunks_fwd(h, kernel, targets, weights, count):
    nll, lse, dh, dkernel = _chunk_loop(h, kernel, targets, weights, count, with_grads=True)
    return nll, (h, kernel, targets, weights, count, lse, dh, dkernel)


def _first_chunks_bwd(residuals, g):
    h, kernel, targets, weights, count, lse, dh_weighted, dkernel_weighted = residuals
    # Is g = scale · weights? (scale: g at the first weighted position; exact comparison.)
    first = jnp.argmax(weights.reshape(-1))
    scale = g.reshape(-1)[first]
    proportional = jnp.all(g == jnp.where(weights, scale, 0.0))

    def scaled():
        return (dh_weighted * scale).astype(h.dtype), (dkernel_weighted * scale).astype(kernel.dtype)

    def recomputed():
        def block(i, k, carry):
            dh, dkernel = carry
            h_c = _blocks(h, i, k)
            logits = _logits(h_c, kernel)
            d_logits = _blocks(g, i, k)[..., None] * _softmax_minus_onehot(logits, _blocks(lse, i, k),
                                                                           _blocks(targets, i, k))
            dh_i, dkernel_i = _head_grads(h_c, kernel, d_logits)
            return _set_blocks(dh, i, k, dh_i), dkernel + dkernel_i

        zeros = (jnp.zeros_like(h), jnp.zeros(kernel.shape, jnp.float32))
        dh, dkernel = _over_chunks(count, block, zeros, h.shape[0])
        return dh, dkernel.astype(kernel.dtype)

    dh, dkernel = jax.lax.cond(proportional, scaled, recomputed)
    return dh, dkernel, None, None, None


_first_chunks_nll.defvjp(_first_chunks_fwd, _first_chunks_bwd)


@jax.custom_vjp
def _permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[g, order[g, i]] for x [G,L,D] and a permutation `order` [G,L] (`inverse` its inverse): a gather in
    both directions (the gradient of a plain gather is a scatter-add, slow on CPU)."""
    return jnp.take_along_axis(x, order[..., None], axis=1)


def _permute_fwd(x, order, inverse):
    return _permute(x, order, inverse), (order, inverse)


def _permute_bwd(residuals, g):
    _, inverse = residuals
    return jnp.take_along_axis(g, inverse[..., None], axis=1), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes the batch is sharded over (by the rules), except `tensor`."""
    axes = logical_to_pspec(("batch",), rules)[0]
    return tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a != TENSOR_AXIS)


def token_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, impl: str = "full",
              chunk_size: int | None = None, mesh: Mesh | None = None, rules: Rules | None = None,
              mask: jax.Array | None = None) -> jax.Array:
    """Float32 negative log-likelihood [B,T] of `targets` [B,T] under logits hidden [B,T,D] @ kernel [D,V].

    `impl` is "full", "chunked" or "vocab_parallel" (the latter needs `mesh` and `rules`; `rules` tell which
    mesh axes the batch is sharded over). The matmul runs in hidden's dtype, accumulating in float32.
    `mask` [B,T] (e.g. the loss mask): only the positions where mask > 0 are wanted; `chunked` and
    `vocab_parallel` then compute only those (0 elsewhere) and skip the chunks that hold none of them.
    """
    if impl == "full":
        return _block_nll(hidden, kernel, targets, 0, None)
    if impl == "chunked":
        groups = 1 if mesh is None or rules is None else math.prod(mesh.shape[a] for a in batch_axes(rules))
        return _chunked_nll(hidden, kernel, targets, 0, None, chunk_size, mask, groups)
    if impl != "vocab_parallel":
        raise ValueError(f"unknown loss impl {impl!r}")
    if mesh is None or rules is None:
        raise ValueError("the vocab_parallel loss needs the mesh and the sharding rules")
    return vocab_parallel_nll(hidden, kernel, targets, mesh=mesh, rules=rules, chunk_size=chunk_size, mask=mask)


def vocab_parallel_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, mesh: Mesh, rules: Rules,
                       chunk_size: int | None = None, mask: jax.Array | None = None) -> jax.Array:
    """`token_nll` with the vocabulary split over the mesh's `tensor` axis (see the module docstring)."""
    vocab = kernel.shape[-1]
    shards = mesh.shape[TENSOR_AXIS]
    if vocab % shards:
        raise ValueError(f"vocab_parallel loss: vocabulary {vocab} is not divisible by mesh.tensor={shards}")
    axes = batch_axes(rules)
    rows = PartitionSpec(axes or None)

    def per_shard(h, w, t, m):
        vocab_start = jax.lax.axis_index(TENSOR_AXIS) * w.shape[-1]
        if m is not None and axes:
            # Each batch shard skips its own chunks, so the head must not be summed over the batch shards
            # inside a skipped chunk: mark it varying here, so its gradient's psum happens once, outside.
            # (The `tensor` shards of a row all skip the same chunks, so their psums inside always meet.)
            w = jax.lax.pcast(w, axes, to="varying")
        return _chunked_nll(h, w, t, vocab_start, TENSOR_AXIS, chunk_size, m)

    if mask is None:
        return jax.shard_map(lambda h, w, t: per_shard(h, w, t, None), mesh=mesh, out_specs=rows,
                             in_specs=(rows, PartitionSpec(None, TENSOR_AXIS), rows))(hidden, kernel, targets)
    return jax.shard_map(per_shard, mesh=mesh, out_specs=rows,
                         in_specs=(rows, PartitionSpec(None, TENSOR_AXIS), rows, rows))(hidden, kernel, targets, mask)


# --------------------------------------------------------------------------------------------- reductions
def loss_sums(nll: jax.Array, batch: Mapping[str, jax.Array], num_tasks: int = 0) -> dict[str, jax.Array]:
    """Sums of nll over the batch's loss tokens, overall, on agent / general conversations, and per task.

    The caller divides: loss = loss_sum / count. Keeping sums (not means) lets micro-batches, hosts and
    validation batches be combined exactly into a token-level mean.
    """
    mask = batch["loss_mask"] > 0
    nll = jnp.where(mask, nll, 0.0)  # never let a padding position's value (even inf/nan) into a sum
    agent = mask & (batch["is_agent"] > 0)
    f32 = jnp.float32
    sums = {
        "loss_sum": nll.sum(), "count": mask.sum(dtype=f32),
        "agent_loss_sum": jnp.where(agent, nll, 0.0).sum(), "agent_count": agent.sum(dtype=f32),
    }
    sums["general_loss_sum"] = sums["loss_sum"] - sums["agent_loss_sum"]
    sums["general_count"] = sums["count"] - sums["agent_count"]
    if num_tasks:
        onehot = jax.nn.one_hot(batch["task_ids"], num_tasks, dtype=f32) * mask[..., None]  # task -1 → zeros
        sums["task_loss_sum"] = jnp.einsum("BTK,BT->K", onehot, nll)
        sums["task_count"] = onehot.sum(axis=(0, 1))
    return sums


def mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, and 0 where there is nothing to average (a batch without loss tokens)."""
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
