"""Grouped-query self-attention with rotary positions, packed-sequence masking and an optional KV cache.
Qwen2 (`cfg.qkv_bias`) adds a bias to the q, k and v projections (not to o), as its Hugging Face model does.

A query attends to a key iff the key's slot is not after the query's (causal) and both carry the same segment
id (packed conversations never see each other): `ops.masking.attention_mask`. Which kernel computes it is
`ops.attention`'s choice per backend (`model.attention_impl`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from agentlm_jax import ops
from agentlm_jax.config import ModelConfig
from agentlm_jax.model.kv_cache import LayerCache
from agentlm_jax.config.schema import LoraConfig
from agentlm_jax.model import lora as lora_lib
from agentlm_jax.model.layers import apply_rotary, param
from agentlm_jax.sharding import constrain


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        init, pdt = jax.nn.initializers.normal(cfg.initializer_range), jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.implementation = cfg.attention_impl
        self.block_size = cfg.attention_block_size
        self.splash_block_size = cfg.splash_block_size
        self.q_proj = param(rngs, init, (D, N, H), ("embed", "heads", "head_dim"), pdt)
        self.k_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt)
        self.v_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt)
        self.o_proj = param(rngs, init, (N, H, D), ("heads", "head_dim", "embed"), pdt)
        if cfg.qkv_bias:  # each bias carries its kernel's output axes
            zeros = jax.nn.initializers.zeros
            self.q_bias = param(rngs, zeros, (N, H), ("heads", "head_dim"), pdt)
            self.k_bias = param(rngs, zeros, (K, H), ("kv_heads", "head_dim"), pdt)
            self.v_bias = param(rngs, zeros, (K, H), ("kv_heads", "head_dim"), pdt)
        self.qkv_bias = cfg.qkv_bias
        lora_lib.attention_adapters(self, cfg, lora, rngs)  # q_proj_lora, ... (none without LoRA)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None, lora_key: jax.Array | None = None
                 ) -> tuple[jax.Array, LayerCache | None]:
        """`lora_key`: the layer's LoRA dropout key (training only; model/lora.py)."""
        dt = self.dtype
        q = ops.project("BTD,DNH->BTNH", x, self.q_proj[...].astype(dt))
        k = ops.project("BSD,DKH->BSKH", x, self.k_proj[...].astype(dt))
        v = ops.project("BSD,DKH->BSKH", x, self.v_proj[...].astype(dt))
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        q, k, v = (lora_lib.add_delta(self, t, x, y, lora_key) for t, y in (("q", q), ("k", k), ("v", v)))
        q = constrain(apply_rotary(q, cos, sin), ("batch", "seq", "act_heads", None))
        k = constrain(apply_rotary(k, cos, sin), ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))

        if cache is None:
            out = ops.attention(q, k, v, segment_ids, impl=self.implementation, block_size=self.block_size,
                                splash_block_size=self.splash_block_size)
        else:  # write this step's keys/values into their slots of this layer, then attend over its whole cache
            at = (cache.layer, 0, 0, cache.start, 0)
            cache = cache._replace(**{name: jax.lax.dynamic_update_slice(
                t, new.transpose(0, 2, 1, 3)[None].astype(t.dtype), at)
                for name, t, new in (("k", cache.k, k), ("v", cache.v, v))})
            if isinstance(cache.start, int) and cache.start == 0:  # a prefill into an empty cache: the prompt's
                # own keys are all it sees (the XLA path then skips each query's later keys)
                out = ops.attention(q, k, v, segment_ids, kv_segment_ids=segment_ids, impl=self.implementation)
            else:
                layer_k, layer_v = (jax.lax.dynamic_index_in_dim(t, cache.layer, 0, keepdims=False).astype(dt)
                                    for t in (cache.k, cache.v))
                out = ops.cached_attention(q, layer_k, layer_v, segment_ids, cache.segment_ids, cache.start)
        out = constrain(out, ("batch", "seq", "act_heads", None))
        out = lora_lib.add_delta(self, "o", out, ops.project("BTNH,NHD->BTD", out, self.o_proj[...].astype(dt)),
                                 lora_key)
        return constrain(out, ("batch", "seq", "act_embed")), cache
