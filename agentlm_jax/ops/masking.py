"""The attention mask of packed, causal sequences, shared by every attention kernel."""

from __future__ import annotations

import jax


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_slots: jax.Array,
                   kv_slots: jax.Array) -> jax.Array:
    """Boolean [B,1,T,S]: a query attends to a key iff the key's slot is not after the query's (causal) and
    both carry the same segment id (packed conversations never see each other). Padding (segment 0) only sees
    padding, so no row is fully masked and none produces NaN; the loss ignores padding's outputs. Built from
    iota comparisons that XLA fuses into the softmax's select: no [B,N,T,S] float mask is materialised."""
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B,T,S]
    causal = kv_slots[None, :] <= q_slots[:, None]  # [T,S]
    return (same_segment & causal[None])[:, None]
