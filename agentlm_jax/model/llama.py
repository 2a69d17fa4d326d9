"""The Llama family (Llama 2, 3.x; Qwen 2.5 by its q/k/v biases): embed → L decoder blocks (scanned) → final
RMSNorm → output head (its own [D, V] matrix, or the embedding table when `tie_word_embeddings`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from agentlm_jax.model.block import DecoderBlock
from agentlm_jax.config import DEFAULT_RULES, ModelConfig, Rules
from agentlm_jax.config.schema import LoraConfig
from agentlm_jax.model.kv_cache import KVCache, LayerCache
from agentlm_jax.model.layers import Embedder, LMHead, RMSNorm, rotary_angles
from agentlm_jax.model.lora import layer_keys as lora_layer_keys
from agentlm_jax.ops import PROJECTION
from agentlm_jax.sharding import state_shardings

# What the backward pass may keep from the forward pass of a block (the rest is recomputed).
REMAT_POLICY = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "save_dots": jax.checkpoint_policies.save_from_both_policies(  # keep matmul outputs (the named projections)
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, jax.checkpoint_policies.save_only_these_names(PROJECTION)),
}
LAYERS_AXIS = "layers"  # logical name of the stacked-layer axis of scanned parameters


class Llama(nnx.Module):
    """`lora` (enabled): LoRA adapters on the projections it targets (model/lora.py); None: the plain model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        self.config = cfg
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embedder = Embedder(cfg.vocab_size, cfg.hidden_size, init=init, dtype=dtype, param_dtype=pdt,
                                 rngs=rngs)
        if cfg.scan_layers:  # one block's parameters stacked L times: [L, ...] with leading axis `layers`
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
            def stacked_blocks(rngs: nnx.Rngs) -> DecoderBlock:
                return DecoderBlock(cfg, rngs=rngs, lora=lora)

            self.layers = stacked_blocks(rngs)
        else:
            self.layers = nnx.List([DecoderBlock(cfg, rngs=rngs, lora=lora) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, init=init, dtype=dtype, param_dtype=pdt,
                                  rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Float32 logits [B,T,V] for int32 tokens, positions and segment ids [B,T] (segment 0 = padding)."""
        return self.logits(self.hidden_states(tokens, positions, segment_ids))

    def logits(self, h: jax.Array) -> jax.Array:
        """Float32 logits [B,T,V] of final-norm hidden states [B,T,D]: the output head, or the tied embedding."""
        return self.embedder.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)

    def hidden_states(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
                      lora_key: jax.Array | None = None) -> jax.Array:
        """The final-norm output [B,T,D] in the compute dtype (what the output head multiplies). `lora_key`: the
        LoRA dropout key of a training step (model/lora.py: one key per layer is folded from it); None: none."""
        h, _ = self._forward(tokens, positions, segment_ids, None, lora_key)
        return h

    def decode(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache, *,
               last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Float32 logits [B,T,V] for T new tokens that follow the `cache.length` cached ones; updated cache.
        `last_only`: logits of the last position only ([B,1,V]; all that sampling needs after a prefill)."""
        h, cache = self.decode_states(tokens, positions, segment_ids, cache)
        return self.logits(h[:, -1:] if last_only else h), cache

    def decode_states(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                      cache: KVCache) -> tuple[jax.Array, KVCache]:
        """`decode`'s final-norm hidden states [B,T,D] instead of its logits (for a caller that needs the logits
        of a few positions only: `logits(h[rows, slots])`); updated cache."""
        return self._forward(tokens, positions, segment_ids, cache)

    # ------------------------------------------------------------------------------------------- internals
    def _forward(self, tokens, positions, segment_ids, cache: KVCache | None, lora_key: jax.Array | None = None):
        cfg = self.config
        x = self.embedder(tokens)
        cos, sin = rotary_angles(positions, cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
        kv_segment_ids = start = None
        if cache is not None:
            start = cache.length
            kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                          (0, start))
        layer_kv = None if cache is None else (cache.k, cache.v)
        keys = None if lora_key is None else lora_layer_keys(lora_key, cfg.num_layers)
        x, layer_kv = self._apply_blocks(x, cos, sin, segment_ids, layer_kv, kv_segment_ids, start, keys)
        if cache is not None:
            cache = KVCache(k=layer_kv[0], v=layer_kv[1], segment_ids=kv_segment_ids,
                            length=start + tokens.shape[1])
        return self.final_norm(x), cache

    def _apply_blocks(self, x, cos, sin, segment_ids, layer_kv, kv_segment_ids, start, keys=None):
        cfg = self.config
        if layer_kv is not None:  # decoding: the whole cache rides in the carry, each layer updates its slots
            def run_cached(block, carry, layer):
                x, k, v = carry
                x, cache = block(x, cos, sin, segment_ids, LayerCache(k, v, kv_segment_ids, start, layer))
                return x, cache.k, cache.v

            if cfg.scan_layers:
                scan = nnx.scan(run_cached, in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry,
                                transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
                x, k, v = scan(self.layers, (x, *layer_kv), jnp.arange(cfg.num_layers, dtype=jnp.int32))
            else:
                carry = (x, *layer_kv)
                for i, block in enumerate(self.layers):
                    carry = run_cached(block, carry, i)
                x, k, v = carry
            return x, (k, v)

        def run_block(block, x, key):
            return block(x, cos, sin, segment_ids, lora_key=key)[0]

        if cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICY[cfg.remat], prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            scan = nnx.scan(run_block, in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry,
                            transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
            return scan(self.layers, x, keys), None
        for i, block in enumerate(self.layers):
            x = run_block(block, x, None if keys is None else keys[i])
        return x, None


def head_kernel(params: dict, cfg: ModelConfig) -> jax.Array:
    """The output head's [D, V] kernel in pure-dict `params` (what the loss multiplies): `lm_head.kernel`, or the
    transposed embedding table when the embeddings are tied."""
    if cfg.tie_word_embeddings:
        return params["embedder"]["embedding"].T
    return params["lm_head"]["kernel"]


# ----------------------------------------------------------------------------------------------- creation
def abstract_model(cfg: ModelConfig, lora: LoraConfig | None = None) -> Llama:
    """The model with shapes and dtypes but no memory (`jax.eval_shape` underneath); with LoRA adapters when
    `lora` is enabled."""
    lora = lora if lora is not None and lora.enabled else None
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), lora=lora))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters, computed from shapes only (nothing is allocated)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))


def init_model(cfg: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
               rules: Rules = DEFAULT_RULES) -> Llama:
    """A randomly initialised model; with a mesh, every parameter is created directly on its sharding."""
    if mesh is None:
        return Llama(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit(out_shardings=shardings)
    def init_state():
        return nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)))

    return nnx.merge(graphdef, init_state())
