"""The one formula of every loss implementation: per position, nll = logsumexp(logits) - logits[target], with
logits = h @ W in float32 (h [B,C,D] hidden states, W [D,v] the output head or its slice of the vocabulary)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def head_logits(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """Float32 logits [B,C,v] of h [B,C,D] against a (slice of the) output head kernel [D,v]."""
    return jnp.einsum("BCD,DV->BCV", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)


def is_target(logits: jax.Array, targets: jax.Array, vocab_start: jax.Array | int = 0) -> jax.Array:
    """[B,C,v] bool: the target's column of a vocabulary slice that starts at `vocab_start`."""
    return jnp.arange(logits.shape[-1]) == (targets - vocab_start)[..., None]


def nll_and_lse(logits: jax.Array, targets: jax.Array, vocab_start: jax.Array | int,
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
    target_logit = jnp.sum(jnp.where(is_target(logits, targets, vocab_start), logits, 0.0), axis=-1)
    if axis_name:
        sum_exp = jax.lax.psum(sum_exp, axis_name)
        target_logit = jax.lax.psum(target_logit, axis_name)
    lse = jnp.log(sum_exp) + row_max
    return lse - target_logit, lse


def block_nll(h: jax.Array, kernel: jax.Array, targets: jax.Array, vocab_start: jax.Array | int,
               axis_name: str | None) -> jax.Array:
    """nll [B,C] of h [B,C,D] against the vocabulary slice kernel [D,v] that starts at `vocab_start`."""
    return nll_and_lse(head_logits(h, kernel), targets, vocab_start, axis_name)[0]
