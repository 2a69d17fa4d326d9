"""The training state and its shardings.

    state = TrainState(step, params, opt_state)    # params: pure dict of the float32 master weights

With LoRA (`lora.enabled`), `params` are the adapters alone (the trainable parameters, model/lora.py) and the
optimizer state is over them; the frozen base weights are not part of the state (the train step takes them as
an argument it does not differentiate, `base_shardings`), so checkpoints hold adapters and optimizer state.

Every leaf has an explicit NamedSharding (`train_state_shardings`): parameters by their logical axes and the
rules, each optimizer moment like its parameter, counters replicated; the train step is compiled with them as
in/out shardings and donates the state. (No RNG state: nothing in the model is stochastic. The paper's hidden
dropout of 0.05 is not implemented; see docs/training.md.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agentlm_jax.config import ModelConfig, Rules
from agentlm_jax.config.schema import LoraConfig
from agentlm_jax.model import lora as lora_lib
from agentlm_jax.model.llama import abstract_model
from agentlm_jax.sharding import state_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict  # pure dict of the model's nnx.Param values (the master weights)
    opt_state: Any  # optax state over `params`


def abstract_params(model_cfg: ModelConfig, lora: LoraConfig | None = None) -> nnx.State:
    """The trainable parameters as an nnx.State of ShapeDtypeStructs (with their logical-axis metadata): the
    model's parameters, or with LoRA enabled the adapters alone."""
    if lora_lib.enabled(lora):
        return lora_lib.abstract_adapters(model_cfg, lora)
    return nnx.state(abstract_model(model_cfg), nnx.Param)


def abstract_base(model_cfg: ModelConfig, lora: LoraConfig) -> nnx.State:
    """The frozen base parameters of a LoRA run (the plain model's, stored in `lora.base_dtype`)."""
    return nnx.state(abstract_model(model_cfg.replace(param_dtype=lora.base_dtype)), nnx.Param)


def base_shardings(model_cfg: ModelConfig, lora: LoraConfig, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings of the frozen base parameters (pure dict), by their logical axes and the rules."""
    return state_shardings(abstract_base(model_cfg, lora), mesh, rules).to_pure_dict()


def init_train_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def train_state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                          rules: Rules, lora: LoraConfig | None = None) -> TrainState:
    """NamedShardings for every leaf of the train state: parameters by their logical axes and the rules;
    optimizer moments like the parameter they belong to; counters replicated."""
    params_abstract = abstract_params(model_cfg, lora)
    param_shardings = state_shardings(params_abstract, mesh, rules).to_pure_dict()
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer), params_abstract.to_pure_dict())
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {tuple(path): s for path, s in jax.tree_util.tree_leaves_with_path(param_shardings)}

    def opt_leaf_sharding(path, leaf):
        # optax keeps a moment per parameter under the parameter's own path (e.g. `.mu['lm_head']['kernel']`).
        for n in range(len(path)):
            sharding = by_path.get(tuple(path[n:]))
            if sharding is not None and tuple(leaf.shape) == tuple(_get(params_abstract, path[n:]).shape):
                return sharding
        return replicated

    return TrainState(step=replicated, params=param_shardings,
                      opt_state=jax.tree_util.tree_map_with_path(opt_leaf_sharding, abstract.opt_state))


def _get(state: nnx.State, path) -> Any:
    node = state
    for key in path:
        node = node[key.key]
    return node


def abstract_train_state(shardings: TrainState, model_cfg: ModelConfig,
                         optimizer: optax.GradientTransformation, lora: LoraConfig | None = None) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target of a checkpoint."""
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer),
                              abstract_params(model_cfg, lora).to_pure_dict())
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
