"""Grouped-query self-attention with rotary positions, packed-sequence masking and an optional KV cache.

Masking rule (training and decoding alike): a query attends to a key iff the key's slot is not after the
query's slot (causal) and both carry the same segment id (packed conversations never see each other). Padding
(segment 0) only sees padding, so its rows are never fully masked and never produce NaN; its outputs are
ignored by the loss. The boolean mask is [B,1,T,S] (shared by all heads) and built from iota comparisons that
XLA fuses into the softmax's select, so no [B,N,T,S] float mask is materialised.

Implementations (`attention_impl`): `blockwise` (model/blockwise_attention.py: tile by tile, skipping the tiles
that are entirely masked, causally or between packed conversations; the default on CPU) and
`jax.nn.dot_product_attention`'s `xla` (the whole [B,N,T,S] square; the default elsewhere, and the decoding
path with a KV cache) or `cudnn` (flash attention on GPU). On TPU, a Pallas splash-attention kernel
(jax.experimental.pallas.ops.tpu.splash_attention, which takes segment ids directly) would avoid the [B,N,T,S]
logits at long sequence lengths; it is not wired in because it cannot be tested on this project's CPU CI.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from agentlm_jax.model.blockwise_attention import blockwise_attention
from agentlm_jax.model.config import ModelConfig
from agentlm_jax.model.kv_cache import LayerCache
from agentlm_jax.model.layers import apply_rotary, attention_mask, dense, param
from agentlm_jax.sharding import constrain


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        init, pdt = jax.nn.initializers.normal(cfg.initializer_range), jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.implementation = resolve_attention_impl(cfg.attention_impl)
        self.block_size = cfg.attention_block_size
        self.q_proj = param(rngs, init, (D, N, H), ("embed", "heads", "head_dim"), pdt)
        self.k_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt)
        self.v_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt)
        self.o_proj = param(rngs, init, (N, H, D), ("heads", "head_dim", "embed"), pdt)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        q, k, v = self._project_in(x)
        q = constrain(apply_rotary(q, cos, sin), ("batch", "seq", "act_heads", None))
        k = constrain(apply_rotary(k, cos, sin), ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))

        T = x.shape[1]
        if cache is None and self.implementation == "blockwise":
            out = blockwise_attention(q, k, v, segment_ids, self.block_size)
            return self._project_out(out), cache
        if cache is None:
            slots = jnp.arange(T)
            mask = attention_mask(segment_ids, segment_ids, slots, slots)
        else:  # write this step's keys/values into their slots, then attend over the whole cache
            at = (0, cache.start, 0, 0)
            cache = cache._replace(k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at),
                                   v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at))
            k, v = cache.k.astype(self.dtype), cache.v.astype(self.dtype)
            mask = attention_mask(segment_ids, cache.segment_ids, cache.start + jnp.arange(T),
                                  jnp.arange(cache.k.shape[1]))

        implementation = "xla" if self.implementation == "blockwise" else self.implementation
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)  # BTNH
        return self._project_out(out), cache

    def _project_in(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        dt = self.dtype
        q = dense("BTD,DNH->BTNH", x, self.q_proj[...].astype(dt))
        k = dense("BSD,DKH->BSKH", x, self.k_proj[...].astype(dt))
        v = dense("BSD,DKH->BSKH", x, self.v_proj[...].astype(dt))
        return q, k, v

    def _project_out(self, out: jax.Array) -> jax.Array:
        out = constrain(out, ("batch", "seq", "act_heads", None))
        out = dense("BTNH,NHD->BTD", out, self.o_proj[...].astype(self.dtype))
        return constrain(out, ("batch", "seq", "act_embed"))


def resolve_attention_impl(impl: str) -> str:
    """What `attention_impl: auto` stands for on this process's default backend."""
    if impl != "auto":
        return impl
    return "blockwise" if jax.default_backend() == "cpu" else "xla"
