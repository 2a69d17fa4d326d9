"""The SwiGLU feed-forward layer: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from agentlm_jax import ops
from agentlm_jax.config import ModelConfig
from agentlm_jax.config.schema import LoraConfig
from agentlm_jax.model import lora as lora_lib
from agentlm_jax.model.layers import param
from agentlm_jax.sharding import constrain


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        D, F = cfg.hidden_size, cfg.intermediate_size
        init, pdt = jax.nn.initializers.normal(cfg.initializer_range), jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = param(rngs, init, (D, F), ("embed", "mlp"), pdt)
        self.up_proj = param(rngs, init, (D, F), ("embed", "mlp"), pdt)
        self.down_proj = param(rngs, init, (F, D), ("mlp", "embed"), pdt)
        lora_lib.mlp_adapters(self, cfg, lora, rngs)  # gate_proj_lora, ... (none without LoRA)

    def __call__(self, x: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        """`lora_key`: the layer's LoRA dropout key (training only; model/lora.py)."""
        dt = self.dtype
        gate = lora_lib.add_delta(self, "gate", x, ops.project("BTD,DF->BTF", x, self.gate_proj[...].astype(dt)),
                                  lora_key)
        up = lora_lib.add_delta(self, "up", x, ops.project("BTD,DF->BTF", x, self.up_proj[...].astype(dt)), lora_key)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
        out = lora_lib.add_delta(self, "down", hidden,
                                 ops.project("BTF,FD->BTD", hidden, self.down_proj[...].astype(dt)), lora_key)
        return constrain(out, ("batch", "seq", "act_embed"))
