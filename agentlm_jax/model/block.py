"""One pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from agentlm_jax.model.attention import Attention
from agentlm_jax.config import ModelConfig
from agentlm_jax.config.schema import LoraConfig
from agentlm_jax.model.kv_cache import LayerCache
from agentlm_jax.model.layers import RMSNorm
from agentlm_jax.model.mlp import MLP
from agentlm_jax.sharding import constrain


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, rngs=rngs, lora=lora)
        self.mlp_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs, lora=lora)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None, lora_key: jax.Array | None = None
                 ) -> tuple[jax.Array, LayerCache | None]:
        """`lora_key`: this layer's LoRA dropout key (training only; model/lora.py), None: no dropout."""
        h, cache = self.attn(self.attn_norm(x), cos, sin, segment_ids, cache, lora_key=lora_key)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x), lora_key=lora_key)
        return constrain(x, ("batch", "seq", "act_embed")), cache
