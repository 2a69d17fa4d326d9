"""The one jitted train step (and the evaluation step).

    step_fn = TrainStep(model_cfg, optimizer, schedule, mesh=mesh, rules=rules, state_shardings=shardings,
                        data=cfg.data, loss=cfg.loss)
    state, metrics = step_fn(state, batch)             # jax.jit, NamedSharding in/out, state donated

One step = the loss over the global batch, as `data.micro_batches` pieces in a `lax.scan` (gradient
accumulation): every piece adds its gradient of Σ nll·mask / (the global batch's loss-token count), so the
update equals the one from a single batch of all rows (token-level mean over every loss token of the global
batch, as the paper's Megatron-LM trainer averages). Then the global gradient norm, clipping and AdamW
(optimizer.py). Parameters live in `param_dtype` (float32 master weights); the model computes in `dtype`
(e.g. bfloat16), so gradients arrive in float32.

LoRA (`lora` enabled): `state.params` are the adapters; the frozen base weights are the step's second argument
(`step_fn.base`, set once by the caller), not donated and never differentiated (`jax.grad` is taken with
respect to the adapters alone, the base closed over), so no gradient, moment or update exists for them.
With `lora.dropout` > 0 the train step (never the eval step) drops the adapters' inputs with the key
`lora.step_key(seed, state.step, micro-batch)`: no random state is carried, a resume draws the same masks, and
the masks do not depend on the mesh. With dropout 0 no key exists and the step is the same computation.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agentlm_jax import ops
from agentlm_jax.config import DataConfig, LossConfig, ModelConfig, Rules
from agentlm_jax.config.schema import LoraConfig
from agentlm_jax.model import lora as lora_lib
from agentlm_jax.data.packing import BATCH_KEYS
from agentlm_jax.model.llama import abstract_model, head_kernel
from agentlm_jax.sharding import activation_sharding, batch_sharding, batch_shards, logical_to_pspec
from agentlm_jax.training import loss as loss_lib
from agentlm_jax.training.state import TrainState

Batch = Mapping[str, jax.Array]


def split_micro_batches(batch: Batch, micro_batches: int, mesh: Mesh, rules: Rules) -> Batch:
    """[G,T] → [M, G/M, T]. Micro-batch m takes rows m, m+M, m+2M, …, so every device keeps its own rows
    (no data moves); the rows' order inside the global batch does not change the summed loss."""

    def split(x):
        g = x.shape[0]
        x = x.reshape(g // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
        pspec = logical_to_pspec((None, "batch", "seq"), rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, pspec))

    return {k: split(v) for k, v in batch.items()}


def check_batch_layout(global_batch: int, micro_batches: int, mesh: Mesh, rules: Rules) -> None:
    """Every micro-batch must split evenly over the devices that share the batch axis."""
    shards = batch_shards(mesh, rules)
    if (global_batch // micro_batches) % shards:
        raise ValueError(f"data.global_batch / data.micro_batches = {global_batch // micro_batches} rows per "
                         f"micro-batch cannot be split over the {shards} devices of the batch mesh axes; make it "
                         f"a multiple of {shards}")


class TrainStep:
    """The compiled train and eval steps for one model, optimizer, mesh, data layout and loss configuration."""

    def __init__(self, model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule, *, mesh: Mesh, rules: Rules, state_shardings: TrainState,
                 data: DataConfig = DataConfig(), loss: LossConfig = LossConfig(), num_tasks: int = 0,
                 lora: LoraConfig | None = None, base_shardings: dict | None = None, seed: int = 0):
        """With LoRA, `base_shardings` are the frozen base's (training.state.base_shardings) and `self.base`
        must be set to the base parameters (pure dict) before the first call. `seed`: the run's seed, from
        which (with the step number) the LoRA dropout masks are drawn."""
        self.model_cfg, self.optimizer, self.schedule = model_cfg, optimizer, schedule
        self.lora = lora if lora_lib.enabled(lora) else None
        self.base: dict | None = None
        self.seed = int(seed)
        self.dropout = lora_lib.uses_dropout(self.lora)
        self.mesh, self.rules = mesh, tuple(rules)
        self.micro_batches = data.micro_batches
        self.loss_impl = ops.resolve_loss_impl(loss.impl, loss.chunk_size, data.max_seq_len, mesh, self.rules)
        self.loss_chunk_size = loss.chunk_size
        self.num_tasks = num_tasks
        self.graphdef, _ = nnx.split(abstract_model(model_cfg, lora=self.lora))
        self.state_shardings = state_shardings
        batch_s = {k: batch_sharding(mesh, rules) for k in BATCH_KEYS}
        replicated = NamedSharding(mesh, PartitionSpec())
        if self.lora is None:
            self._train = jax.jit(self._train_step, in_shardings=(state_shardings, batch_s),
                                  out_shardings=(state_shardings, replicated), donate_argnums=0)
            self._eval = jax.jit(self._eval_sums, in_shardings=(state_shardings.params, batch_s),
                                 out_shardings=replicated)
        else:
            if base_shardings is None:
                raise ValueError("TrainStep with LoRA needs base_shardings (training.state.base_shardings)")
            self._train = jax.jit(self._lora_train_step, in_shardings=(state_shardings, base_shardings, batch_s),
                                  out_shardings=(state_shardings, replicated), donate_argnums=0)
            self._eval = jax.jit(self._lora_eval_sums,
                                 in_shardings=(state_shardings.params, base_shardings, batch_s),
                                 out_shardings=replicated)

    def _base_args(self, base: dict | None) -> tuple:
        if self.lora is None:
            return ()
        base = self.base if base is None else base
        if base is None:
            raise ValueError("a LoRA TrainStep needs its frozen base parameters: set step_fn.base first")
        return (base,)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        return self._train(state, *self._base_args(None), {k: batch[k] for k in BATCH_KEYS})

    def eval_sums(self, params: dict, batch: Batch) -> dict[str, jax.Array]:
        """Loss sums of one validation batch: overall, agent/general and per task (see loss.loss_sums)."""
        return self._eval(params, *self._base_args(None), {k: batch[k] for k in BATCH_KEYS})

    def lower(self, state: TrainState, batch: Batch, base: dict | None = None):
        """The train step lowered for these (possibly abstract) arguments; with LoRA, `base` (or `self.base`)."""
        return self._train.lower(state, *self._base_args(base), {k: batch[k] for k in BATCH_KEYS})

    # ----------------------------------------------------------------------------------------- traced code
    def token_nll(self, params: dict, batch: Batch, base: dict | None = None,
                  dropout_key: jax.Array | None = None) -> jax.Array:
        """nll [B,T] of the loss positions' targets (0 elsewhere with the chunked losses, which compute only the
        loss positions; loss_sums masks in any case). With LoRA, `params` are the adapters over `base`;
        `dropout_key` (training only): the LoRA dropout key of this micro-batch."""
        with activation_sharding(self.mesh, self.rules):
            if base is not None:
                params = lora_lib.merge_trees(base, params)
            model = nnx.merge(self.graphdef, params)
            hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                         lora_key=dropout_key)
            return ops.token_nll(hidden, head_kernel(params, self.model_cfg), batch["targets"], impl=self.loss_impl,
                                 chunk_size=self.loss_chunk_size, mesh=self.mesh, rules=self.rules,
                                 mask=batch["loss_mask"])

    def _loss_share(self, params: dict, batch: Batch, count: jax.Array, base: dict | None = None,
                    dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Σ nll·mask of this (micro-)batch / `count`, the global batch's loss-token count; the loss sums."""
        sums = loss_lib.loss_sums(self.token_nll(params, batch, base, dropout_key), batch)
        return sums["loss_sum"] / jnp.maximum(count, 1.0), sums

    def _grads_and_sums(self, params: dict, batch: Batch, base: dict | None = None,
                        step: jax.Array | None = None) -> tuple[dict, dict[str, jax.Array]]:
        """The gradient of the token-level mean loss over the global batch (the micro-batches' gradients of
        Σ nll·mask / global count, summed: the count is known before any forward pass, so the gradients come
        out divided, with no extra pass over them) and the loss sums. `step` (with LoRA dropout): the optimizer
        step whose dropout masks to draw (micro-batch m: lora.step_key(seed, step, m)); None: no dropout."""
        count = jnp.sum(batch["loss_mask"] > 0, dtype=jnp.float32)

        def key(m):
            return None if step is None or not self.dropout else lora_lib.step_key(self.seed, step, m)

        # argument 0 only: with LoRA the base (closed over here) gets no gradient at all
        grad_fn = jax.grad(lambda p, b, c, k: self._loss_share(p, b, c, base, k), has_aux=True)
        if self.micro_batches == 1:
            return grad_fn(params, batch, count, key(0))
        param_shardings = self.state_shardings.params

        def accumulate(carry, xs):
            micro, m = xs
            grads, sums = grad_fn(params, micro, count, key(m))
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        micro = split_micro_batches(batch, self.micro_batches, self.mesh, self.rules)
        _, sums_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), count, key(0))
        zero_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape)
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        indices = jnp.arange(self.micro_batches, dtype=jnp.uint32) if self.dropout and step is not None else None
        (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), (micro, indices))
        return grads, sums

    def _lora_train_step(self, state: TrainState, base: dict, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        return self._train_step(state, batch, base)

    def _lora_eval_sums(self, params: dict, base: dict, batch: Batch) -> dict[str, jax.Array]:
        return loss_lib.loss_sums(self.token_nll(params, batch, base), batch, self.num_tasks)

    def _train_step(self, state: TrainState, batch: Batch,
                    base: dict | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
        grads, sums = self._grads_and_sums(state.params, batch, base, state.step if self.dropout else None)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_lib.mean(sums["loss_sum"], sums["count"]),
            "agent_loss": loss_lib.mean(sums["agent_loss_sum"], sums["agent_count"]),
            "general_loss": loss_lib.mean(sums["general_loss_sum"], sums["general_count"]),
            "loss_tokens": sums["count"],
            "agent_loss_tokens": sums["agent_count"],
            "grad_norm": optax.global_norm(grads),  # before clipping
            "learning_rate": self.schedule(state.step),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_sums(self, params: dict, batch: Batch) -> dict[str, jax.Array]:
        return loss_lib.loss_sums(self.token_nll(params, batch), batch, self.num_tasks)
