"""The training loss: token-level mean negative log-likelihood over the loss tokens of the global batch.

`ops.token_nll` gives the per-position nll (by whichever implementation); this module reduces it to sums
overall, on agent / general conversations and per task. Keeping sums (not means) lets micro-batches, hosts
and validation batches be combined exactly into a token-level mean (as the paper's Megatron-LM trainer
averages); the train step divides Σ nll·mask of each micro-batch by the global batch's loss-token count.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

def loss_sums(nll: jax.Array, batch: Mapping[str, jax.Array], num_tasks: int = 0) -> dict[str, jax.Array]:
    """Sums of nll over the batch's loss tokens, overall, on agent / general conversations, and per task.

    The caller divides: loss = loss_sum / count. Keeping sums (not means) lets micro-batches, hosts and
    validation batches be combined exactly into a token-level mean.
    """
    mask = batch["loss_mask"] > 0
    nll = jnp.where(mask, nll, 0.0)  # never let a padding position's value (even inf/nan) into a sum
    agent = mask & (batch["is_agent"] > 0)
    f32 = jnp.float32
    sums = {
        "loss_sum": nll.sum(), "count": mask.sum(dtype=f32),
        "agent_loss_sum": jnp.where(agent, nll, 0.0).sum(), "agent_count": agent.sum(dtype=f32),
    }
    sums["general_loss_sum"] = sums["loss_sum"] - sums["agent_loss_sum"]
    sums["general_count"] = sums["count"] - sums["agent_count"]
    if num_tasks:
        onehot = jax.nn.one_hot(batch["task_ids"], num_tasks, dtype=f32) * mask[..., None]  # task -1 → zeros
        sums["task_loss_sum"] = jnp.einsum("BTK,BT->K", onehot, nll)
        sums["task_count"] = onehot.sum(axis=(0, 1))
    return sums


def mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, and 0 where there is nothing to average (a batch without loss tokens)."""
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
