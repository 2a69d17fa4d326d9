"""Causal, segment-masked grouped-query attention, by the kernel `ops.backend.attention_impl` picks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from agentlm_jax import sharding
from agentlm_jax.config import ModelConfig
from agentlm_jax.ops.backend import attention_impl, current_platform, devices_platform
from agentlm_jax.ops.cpu.blockwise_attention import blockwise_attention
from agentlm_jax.ops.gpu import flash_attention as flash
from agentlm_jax.ops.masking import attention_mask
from agentlm_jax.ops.tpu import splash_attention as splash


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
              kv_segment_ids: jax.Array | None = None, q_start: jax.Array | int = 0, impl: str = "auto",
              block_size: int = ModelConfig.attention_block_size,
              splash_block_size: int = ModelConfig.splash_block_size) -> jax.Array:
    """Attention output [B,T,N,H] of q [B,T,N,H] over k, v [B,S,K,H] (K divides N; scores scaled by 1/sqrt(H),
    softmax in float32), masked by `masking.attention_mask`.

    Training: self-attention over a packed batch, S = T, `segment_ids` [B,T] for both sides. Decoding: k and v
    are the whole KV cache, `kv_segment_ids` [B,S] its slots' segments, and the T queries sit at slots
    q_start, q_start + 1, ... The Pallas kernels take whole blocks (splash: of 128 positions or more): a sequence
    one cannot take (e.g. a 33-token prompt) is computed by XLA's attention instead.
    """
    chosen = attention_impl(impl, current_platform(), cached=kv_segment_ids is not None)
    if chosen == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, block_size)
    mesh, rules = sharding.active_mesh(), sharding.active_rules()
    if chosen == "splash" and splash.supports(q.shape[1], splash_block_size):
        return splash.splash_attention(q, k, v, segment_ids, block_size=splash_block_size, mesh=mesh, rules=rules,
                                       interpret=devices_platform() != "tpu")
    if chosen == "flash" and flash.supports(q.shape[1], block_size):
        return flash.flash_attention(q, k, v, segment_ids, block_size=block_size, mesh=mesh, rules=rules,
                                     interpret=devices_platform() != "gpu")
    if chosen in ("splash", "flash"):
        chosen = "xla"
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    mask = attention_mask(segment_ids, kv_segment_ids, q_start + jnp.arange(q.shape[1]), jnp.arange(k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if chosen == "default" else chosen)
