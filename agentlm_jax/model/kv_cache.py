"""The key/value cache for decoding: fixed-size slots, so every decode step has the same shapes (one compile).

Prompts of a batch are left-padded to a common length, so all rows fill the same slots at each step and one
scalar `length` says how many slots are filled. Padding slots have segment id 0 and are never attended to by
real tokens; positions (which drive the rotary angles) are explicit per token, so left padding does not shift
them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from agentlm_jax.config import ModelConfig


class LayerCache(NamedTuple):
    """The cache as one layer sees it while it runs: the whole of every layer's keys and values, and which
    layer it is. The layer writes its new slots in place and reads its own slice; passing it one layer's
    slice instead (scan inputs and outputs) would copy the whole cache several times per decoded token."""

    k: jax.Array  # [L,B,K,S,H]
    v: jax.Array  # [L,B,K,S,H]
    segment_ids: jax.Array  # [B,S] int32, already holding the segment ids of the tokens being added
    start: jax.Array | int  # [] int32, the slot of the first token being added (an int: known when tracing)
    layer: jax.Array | int  # [] int32, this layer's index into k and v


class KVCache(NamedTuple):
    k: jax.Array  # [L,B,K,S,H]
    v: jax.Array  # [L,B,K,S,H]
    segment_ids: jax.Array  # [B,S] int32; 0 = empty slot or padding
    # [] int32, slots filled so far; a Python int where known when tracing (an empty cache, and after its
    # prefill), so that the prefill's attention can skip each query's later slots (ops.attention)
    length: jax.Array | int

    @classmethod
    def create(cls, cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> "KVCache":
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_length, cfg.resolved_head_dim)
        dtype = jnp.dtype(dtype or cfg.dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch_size, max_length), jnp.int32), length=0)

    @property
    def max_length(self) -> int:
        return self.segment_ids.shape[1]
