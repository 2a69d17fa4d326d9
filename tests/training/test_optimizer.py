"""The optimizer: the documented learning-rate formula, the weight-decay mask, and AdamW + clipping equal to
PyTorch's `torch.optim.AdamW` with `clip_grad_norm_`."""

import math

import jax
import numpy as np
import pytest
import torch

from agentlm_jax.config import OptimizerConfig
from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from agentlm_jax.training.state import abstract_params
from tests.helpers.training import TINY_MODEL
def documented_lr(k: int, peak: float, floor: float, w: int, d: int) -> float:
    """The formula in optimizer.py's docstring, for update k = 1..N."""
    if k <= w:
        return peak * k / w
    if k <= d:
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (k - w) / (d - w)))
    return floor


@pytest.mark.parametrize("steps, warmup, decay, w, d", [(2000, 0.02, 0.9, 40, 1800), (50, 0.1, 0.5, 5, 25),
                                                         (10, 0.0, 1.0, 0, 10)])
def test_schedule_follows_the_documented_formula(steps, warmup, decay, w, d):
    cfg = OptimizerConfig(learning_rate=5e-5, min_learning_rate=1e-6, warmup_fraction=warmup, decay_fraction=decay)
    schedule = learning_rate_schedule(cfg, steps)
    got = np.asarray(schedule(np.arange(steps)))  # optax passes the number of updates done so far
    want = np.array([documented_lr(k, 5e-5, 1e-6, w, d) for k in range(1, steps + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert got[0] > 0, "the first update must not be wasted with lr 0"
    if w:
        assert got[w - 1] == pytest.approx(5e-5), "the peak is reached at update w"


def test_weight_decay_applies_to_matrices_but_never_to_norm_scales():
    mask = weight_decay_mask(abstract_params(TINY_MODEL))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert {k for k, v in flat.items() if not v} == {
        "['final_norm']['scale']", "['layers']['attn_norm']['scale']", "['layers']['mlp_norm']['scale']"}
    no_embedding = weight_decay_mask(abstract_params(TINY_MODEL), decay_embedding=False)
    assert no_embedding["embedder"]["embedding"] is False and no_embedding["lm_head"]["kernel"] is True
    qwen = weight_decay_mask(abstract_params(TINY_MODEL.replace(architecture="qwen2")))["layers"]["attn"]
    assert (qwen["q_bias"], qwen["k_bias"], qwen["v_bias"], qwen["q_proj"]) == (False, False, False, True)


def test_adamw_with_clipping_matches_torch():
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_fraction=0.25, decay_fraction=1.0, clip_norm=0.5)
    steps = 4
    abstract = abstract_params(TINY_MODEL.replace(num_layers=1))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(np.float32), abstract.to_pure_dict())
    optimizer = make_optimizer(cfg, steps, abstract)
    mask = weight_decay_mask(abstract)
    leaves, treedef = jax.tree.flatten(params)
    decays = jax.tree.leaves(mask)

    torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in leaves]
    groups = [{"params": [p for p, dec in zip(torch_params, decays) if dec], "weight_decay": cfg.weight_decay},
              {"params": [p for p, dec in zip(torch_params, decays) if not dec], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    schedule = learning_rate_schedule(cfg, steps)
    torch_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda n: float(schedule(n)) / cfg.learning_rate)

    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for _ in range(steps):
        grads = [(rng.standard_normal(x.shape) * rng.choice([1e-3, 1.0])).astype(np.float32) for x in leaves]
        updates, state = update(jax.tree.unflatten(treedef, grads), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for p, g in zip(torch_params, grads):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(torch_params, cfg.clip_norm)
        torch_opt.step()
        torch_sched.step()
    for ours, theirs in zip(jax.tree.leaves(params), torch_params):
        np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=2e-5, atol=2e-6)
