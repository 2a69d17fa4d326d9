"""Causal, segment-masked grouped-query attention, by the kernel `ops.backend.attention_impl` picks; and the
attention of decoded tokens over a KV cache (`cached_attention`)."""

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

    Training: self-attention over a packed batch, S = T, `segment_ids` [B,T] for both sides. With a KV cache
    (`kv_segment_ids` [B,S] its slots' segments: the XLA path), the T queries sit at slots q_start, q_start + 1,
    ...; where q_start is a Python int (a prefill from slot 0), the XLA path skips each query chunk's later keys
    (`_causal_chunks`). Decoding over the model's cache layout is `cached_attention`. The Pallas kernels take
    whole blocks (splash: of 128 positions or more): a sequence one cannot take (e.g. a 33-token prompt) is
    computed by XLA's attention instead.
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
    if chosen == "xla" and isinstance(q_start, int):
        return _causal_chunks(q, k, v, segment_ids, kv_segment_ids, q_start)
    mask = attention_mask(segment_ids, kv_segment_ids, q_start + jnp.arange(q.shape[1]), jnp.arange(k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if chosen == "default" else chosen)


def _causal_chunks(q, k, v, segment_ids, kv_segment_ids, q_start: int, chunks: int = 2,
                   min_chunk: int = 128) -> jax.Array:
    """XLA attention with the queries' first slot known when tracing (a prefill into an empty cache, or
    self-attention): the queries are cut into up to `chunks` parts and each attends to the keys up to its last
    slot only, the rest being causally masked anyway: about (chunks + 1) / (2 · chunks) of the dense work (a
    1,024-token prefill's attention on CPU: 116 ms instead of 193 with two chunks; more chunks saved little more
    and compiled longer). Every query sees exactly the keys it sees in one dense call."""
    T, S = q.shape[1], k.shape[1]
    n = max(1, min(chunks, T // min_chunk))
    bounds = [T * j // n for j in range(n + 1)]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        keys = max(1, min(S, q_start + hi))
        mask = attention_mask(segment_ids[:, lo:hi], kv_segment_ids[:, :keys], q_start + lo + jnp.arange(hi - lo),
                              jnp.arange(keys))
        outs.append(jax.nn.dot_product_attention(q[:, lo:hi], k[:, :keys], v[:, :keys], mask=mask,
                                                 implementation="xla"))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, kv_segment_ids: jax.Array,
                     q_start: jax.Array | int) -> jax.Array:
    """Attention output [B,T,N,H] of T new queries [B,T,N,H] at slots q_start, ... over a KV cache k, v [B,K,S,H]
    (the cache's layout: each head's slots contiguous, so both products read the cache where it lies; with
    [B,S,K,H], XLA:CPU copied every layer's keys and values transposed at every decoded token), masked by
    `masking.attention_mask`. Float32 scores scaled by 1/sqrt(H) and a float32 softmax, as in
    `jax.nn.dot_product_attention`'s XLA implementation."""
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    # Both products as plain batched matmuls over (B, K): rows Q = (G, T), so no operand is copied transposed.
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = jnp.einsum("BKQH,BKSH->BKQS", q, k, preferred_element_type=jnp.float32) * jnp.float32(H ** -0.5)
    mask = attention_mask(segment_ids, kv_segment_ids, q_start + jnp.arange(T), jnp.arange(S))  # [B,1,T,S]
    mask = jnp.broadcast_to(mask[:, :, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    scores = jnp.where(mask, scores, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKQS,BKSH->BKQH", probs, v).reshape(B, K, G, T, H)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
