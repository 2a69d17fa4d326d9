"""AdamW as the paper trains (docs/paper.md): β = (0.9, 0.95), ε = 1e-8, weight decay 0.1 (not on norms), global
gradient-norm clipping at 1.0, and a linear-warmup cosine learning-rate schedule.

The schedule, for the optimizer update numbered k = 1 … N (N = `steps`), with peak P, floor m,
w = round(warmup_fraction · N) warmup updates and d = max(round(decay_fraction · N), w + 1):

    lr(k) = P · k / w                                        for k ≤ w
    lr(k) = m + (P − m) · ½ · (1 + cos(π · (k − w) / (d − w)))  for w < k ≤ d
    lr(k) = m                                                for k > d

so the rate reaches P at update w, falls along a half cosine to m at update d ("decay over 90 %" of the
steps, as Megatron-LM's `lr-decay-iters`), and stays there. Paper recipe: warmup 2 %, decay 90 %, m = 0.
It is `optax.warmup_cosine_decay_schedule` evaluated at k (optax counts updates from 0, so the first update
would get lr 0; we shift by one so no update is wasted).

Weight decay: decoupled (AdamW), masked off every parameter with a `norm` logical axis (RMSNorm scales).
The token embedding is decayed like every matrix, as Megatron-LM does (its no-decay group is biases and
norms only); `decay_embedding=False` exempts it.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from agentlm_jax.config import OptimizerConfig
from agentlm_jax.sharding import variable_logical_axes

EMBEDDING_MODULE = "embedder"  # the token embedding's module name in agentlm_jax.model.llama.Llama


def warmup_and_decay_steps(cfg: OptimizerConfig, steps: int) -> tuple[int, int]:
    warmup = round(cfg.warmup_fraction * steps)
    return warmup, max(round(cfg.decay_fraction * steps), warmup + 1)


def learning_rate_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """lr as a function of the number of updates already applied (optax's `count`); see the module doc."""
    warmup, decay_end = warmup_and_decay_steps(cfg, steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup, decay_steps=decay_end,
        end_value=cfg.min_learning_rate)
    return lambda count: schedule(count + 1)


def weight_decay_mask(abstract_params: nnx.State, decay_embedding: bool = True) -> dict[str, Any]:
    """A pure-dict tree of bools matching `abstract_params.to_pure_dict()`: True = apply weight decay."""

    def decays(path, variable) -> bool:
        axes = variable_logical_axes(variable) or ()
        is_embedding = any(getattr(k, "key", None) == EMBEDDING_MODULE for k in path)
        is_bias = str(getattr(path[-1], "key", "")).endswith("bias")  # as Megatron-LM: no decay on biases
        return variable.replace("norm" not in axes and not is_bias and (decay_embedding or not is_embedding))

    mask = jax.tree_util.tree_map_with_path(decays, abstract_params,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))
    return mask.to_pure_dict()


def make_optimizer(cfg: OptimizerConfig, steps: int, abstract_params: nnx.State) -> optax.GradientTransformation:
    """clip by global norm → AdamW (masked decay) with the warmup-cosine schedule, over pure-dict params."""
    adamw = optax.adamw(learning_rate_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay,
                        mask=weight_decay_mask(abstract_params, cfg.decay_embedding))
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
