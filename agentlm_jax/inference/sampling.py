"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p (nucleus)
(config.SamplingConfig)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from agentlm_jax.config import SamplingConfig


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Float32 logits [B,V] scaled by the temperature, with tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        kth_largest = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        kept = mass_before < cfg.top_p  # always keeps the most likely token
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token ids [B] (int32) for logits [B,V]."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
