"""The chunked losses' CPU kernels: a loop over exactly the needed chunks with the head's gradients fused into
the forward pass, and a gather whose gradient is a gather (ops.cross_entropy calls them only on CPU).

Both were written for XLA:CPU: a scan with a `lax.cond` per chunk still builds and adds a zero [D,V] kernel
gradient for every skipped chunk, small [C,V] matmuls are slow there (so two chunks are taken at a time), and
the gradient of a plain gather is a scatter-add, slow on CPU. Timings: bench/RESULTS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from agentlm_jax.ops.nll import head_logits, is_target, nll_and_lse


@jax.custom_vjp
def first_chunks_nll(h: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array,
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
    return jnp.exp(logits - lse[..., None]) - is_target(logits, targets)


def _chunk_loop(h, kernel, targets, weights, count, with_grads: bool):
    """(nll, lse) [n,G,W] of the first `count` chunks; `with_grads`: also (dh [n,G,W,D], dkernel [D,V]),
    the gradient of Σ weights·nll."""
    def block(i, k, carry):
        nll, lse, *grads = carry
        h_c, t_c = _blocks(h, i, k), _blocks(targets, i, k)
        logits = head_logits(h_c, kernel)
        nll_i, lse_i = nll_and_lse(logits, t_c, 0, None)
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
            logits = head_logits(h_c, kernel)
            d_logits = _blocks(g, i, k)[..., None] * _softmax_minus_onehot(logits, _blocks(lse, i, k),
                                                                           _blocks(targets, i, k))
            dh_i, dkernel_i = _head_grads(h_c, kernel, d_logits)
            return _set_blocks(dh, i, k, dh_i), dkernel + dkernel_i

        zeros = (jnp.zeros_like(h), jnp.zeros(kernel.shape, jnp.float32))
        dh, dkernel = _over_chunks(count, block, zeros, h.shape[0])
        return dh, dkernel.astype(kernel.dtype)

    dh, dkernel = jax.lax.cond(proportional, scaled, recomputed)
    return dh, dkernel, None, None, None


first_chunks_nll.defvjp(_first_chunks_fwd, _first_chunks_bwd)


@jax.custom_vjp
def permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[g, order[g, i]] for x [G,L,D] and a permutation `order` [G,L] (`inverse` its inverse): a gather in
    both directions (the gradient of a plain gather is a scatter-add, slow on CPU)."""
    return jnp.take_along_axis(x, order[..., None], axis=1)


def _permute_fwd(x, order, inverse):
    return permute(x, order, inverse), (order, inverse)


def _permute_bwd(residuals, g):
    _, inverse = residuals
    return jnp.take_along_axis(g, inverse[..., None], axis=1), None, None


permute.defvjp(_permute_fwd, _permute_bwd)
