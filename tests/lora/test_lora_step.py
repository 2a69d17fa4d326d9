"""LoRA in the model and the train step: step 0 is the base model exactly; only the adapters get gradients
and optimizer state; sharded LoRA training equals one device; the adapters carry logical axes.

Tolerances as tests/training/test_train_step.py (float32; only the summation order differs between layouts):
losses to rtol 2e-6; adapters after 3 AdamW steps to 2 % of one step's largest move (lr = 1e-2 here, so 2e-4;
Adam amplifies the layouts' rounding where a gradient is nearly noise). A real error moves them by ~lr.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from agentlm_jax.config import DEFAULT_RULES, DataConfig, LossConfig, MeshConfig, OptimizerConfig
from agentlm_jax.config.schema import LoraConfig
from agentlm_jax.data import iterator
from agentlm_jax.data.packing import BATCH_KEYS
from agentlm_jax.model import lora as lora_lib
from agentlm_jax.model.llama import Llama, init_model
from agentlm_jax.sharding import make_mesh
from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
from agentlm_jax.training.state import abstract_params, base_shardings, init_train_state, train_state_shardings
from agentlm_jax.training.step import TrainStep
from tests.helpers.training import BATCH, SEQ, TINY_MODEL, write_dataset

LORA = LoraConfig(enabled=True, rank=4, alpha=8.0, base_dtype="float32")
STEPS = 3
LR = 1e-2  # adapters start at B = 0: a large rate moves them visibly in 3 steps
LOSS_RTOL = 2e-6
PARAM_ATOL = 2e-4


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    data_dir = write_dataset(str(tmp_path_factory.mktemp("data")), train=96, validation=8)
    it = iterator.train_iterator(DataConfig(path=data_dir, global_batch=BATCH, max_seq_len=SEQ), seed=0,
                                 process_index=0, process_count=1)
    out = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(STEPS)]
    it.close()
    return out


@pytest.fixture(scope="module")
def base():
    return jax.device_get(nnx.state(init_model(TINY_MODEL, seed=0), nnx.Param).to_pure_dict())


@pytest.fixture(scope="module")
def adapters():
    return jax.device_get(lora_lib.init_adapters(TINY_MODEL, LORA, seed=1).to_pure_dict())


def lora_model(base, adapters, cfg=TINY_MODEL, lora=LORA):
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), lora=lora))
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, lora_lib.merge_trees(base, adapters))


def inputs(batch):
    return batch["tokens"], batch["positions"], batch["segment_ids"]


def test_step_zero_is_the_base_model_exactly(base, adapters, batches):
    plain = nnx.merge(nnx.split(nnx.eval_shape(lambda: Llama(TINY_MODEL, rngs=nnx.Rngs(0))))[0], base)
    want = np.asarray(plain(*inputs(batches[0])))
    got = np.asarray(lora_model(base, adapters)(*inputs(batches[0])))
    np.testing.assert_array_equal(got, want)
    assert all(np.abs(a["a"]).max() > 0 and not np.any(a["b"])
               for m in adapters["layers"].values() for a in m.values()), "A random, B zero"
    # and the adapters do act once B is not zero
    moved = jax.tree.map(lambda x: x + 0.05, adapters)
    assert np.abs(np.asarray(lora_model(base, moved)(*inputs(batches[0]))) - want).max() > 1e-3


def test_adapters_carry_logical_axes_and_follow_the_rules():
    abstract = lora_lib.abstract_adapters(TINY_MODEL, LORA)
    attn, mlp = abstract["layers"]["attn"], abstract["layers"]["mlp"]
    axes = {n: v.get_metadata()["out_sharding"] for n, v in (
        ("q.a", attn["q_proj_lora"]["a"]), ("q.b", attn["q_proj_lora"]["b"]), ("o.a", attn["o_proj_lora"]["a"]),
        ("o.b", attn["o_proj_lora"]["b"]), ("down.a", mlp["down_proj_lora"]["a"]))}
    assert axes == {"q.a": ("layers", "embed", "lora_rank"), "q.b": ("layers", "lora_rank", "heads", "head_dim"),
                    "o.a": ("layers", "heads", "head_dim", "lora_rank"), "o.b": ("layers", "lora_rank", "embed"),
                    "down.a": ("layers", "mlp", "lora_rank")}
    only_qv = lora_lib.abstract_adapters(TINY_MODEL, LoraConfig(enabled=True, targets=("q", "v")))
    assert set(only_qv["layers"]["attn"]) == {"q_proj_lora", "v_proj_lora"} and "mlp" not in only_qv["layers"]


def make_step(mesh_cfg, lora=LORA, model_cfg=TINY_MODEL, loss_impl="full", micro_batches=1):
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    mesh = make_mesh(mesh_cfg, jax.devices()[:n])
    opt_cfg = OptimizerConfig(learning_rate=LR, warmup_fraction=0.0)
    optimizer = make_optimizer(opt_cfg, 10, abstract_params(model_cfg, lora))
    shardings = train_state_shardings(model_cfg, optimizer, mesh, DEFAULT_RULES, lora=lora)
    base_s = base_shardings(model_cfg, lora, mesh, DEFAULT_RULES)
    step = TrainStep(model_cfg, optimizer, learning_rate_schedule(opt_cfg, 10), mesh=mesh, rules=DEFAULT_RULES,
                     state_shardings=shardings, data=DataConfig(global_batch=BATCH, max_seq_len=SEQ,
                                                                micro_batches=micro_batches),
                     loss=LossConfig(impl=loss_impl), lora=lora, base_shardings=base_s)
    return step, optimizer, shardings, base_s


def train(base, adapters, batches, mesh_cfg, **kw):
    step, optimizer, shardings, base_s = make_step(mesh_cfg, **kw)
    state = jax.device_put(init_train_state(adapters, optimizer), shardings)
    step.base = jax.device_put(base, base_s)
    losses = []
    for batch in batches:
        state, metrics = step(state, {k: batch[k] for k in BATCH_KEYS})
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), state, step


@pytest.fixture(scope="module")
def single_device(base, adapters, batches, compilation_cache):
    return train(base, adapters, batches, MeshConfig(data=1, fsdp=1, tensor=1))


def test_only_the_adapters_get_gradients_and_optimizer_state(base, adapters, batches, single_device):
    losses, trained, state, step = single_device
    # the gradient tree is the adapters' tree: nothing is differentiated for the base
    grads0, _ = jax.jit(step._grads_and_sums)(adapters, batches[0], base)
    assert jax.tree.structure(grads0) == jax.tree.structure(adapters)
    first = grads0["layers"]["attn"]["q_proj_lora"]
    assert not np.any(first["a"]) and np.abs(first["b"]).max() > 0, "at B = 0 only B has a gradient"
    grads1, _ = jax.jit(step._grads_and_sums)(trained, batches[0], base)
    for module in grads1["layers"].values():
        for name, g in module.items():
            assert np.abs(g["a"]).max() > 0 and np.abs(g["b"]).max() > 0, name
    # the base is untouched (it is an input of the step, never donated nor updated)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(step.base)), jax.tree.leaves(base)))
    assert losses[-1] < losses[0]
    # the optimizer state is adapter-sized: Adam's two moments per adapter parameter, nothing per base weight
    adapter_bytes, base_bytes = lora_lib.tree_bytes(trained), lora_lib.tree_bytes(base)
    opt_bytes = lora_lib.tree_bytes(state.opt_state)
    assert 2 * adapter_bytes <= opt_bytes <= 2 * adapter_bytes + 1024
    assert opt_bytes < base_bytes / 5


def test_the_compiled_step_holds_no_base_sized_gradient(base, adapters, batches, single_device):
    """XLA's memory analysis: the LoRA step's temporaries and outputs are far below full fine-tuning's, whose
    state (params + 2 moments) and gradient are each base-sized."""
    step = single_device[3]
    abstract_batch = {k: jax.ShapeDtypeStruct(batches[0][k].shape, batches[0][k].dtype) for k in BATCH_KEYS}
    lora_mem = step.lower(single_device[2], abstract_batch).compile().memory_analysis()
    full_opt = make_optimizer(OptimizerConfig(), 10, abstract_params(TINY_MODEL))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    full_s = train_state_shardings(TINY_MODEL, full_opt, mesh, DEFAULT_RULES)
    full = TrainStep(TINY_MODEL, full_opt, learning_rate_schedule(OptimizerConfig(), 10), mesh=mesh,
                     rules=DEFAULT_RULES, state_shardings=full_s, data=DataConfig(global_batch=BATCH, max_seq_len=SEQ))
    full_state = jax.eval_shape(lambda p: init_train_state(p, full_opt), base)
    full_mem = full.lower(full_state, abstract_batch).compile().memory_analysis()
    base_bytes = lora_lib.tree_bytes(base)
    assert lora_mem.output_size_in_bytes < base_bytes / 5  # the state out: adapters + moments
    assert full_mem.output_size_in_bytes > 2.9 * base_bytes
    assert lora_mem.temp_size_in_bytes < full_mem.temp_size_in_bytes - 0.8 * base_bytes  # no base gradient


@pytest.mark.parametrize("mesh_cfg, loss_impl", [
    (MeshConfig(data=1, fsdp=4, tensor=2), "vocab_parallel"),
], ids=["fsdp4-tensor2"])
def test_sharded_lora_training_equals_one_device(base, adapters, batches, single_device, mesh_cfg, loss_impl):
    sharded = train(base, adapters, batches, mesh_cfg, loss_impl=loss_impl)
    np.testing.assert_allclose(sharded[0], single_device[0], rtol=LOSS_RTOL)
    moved = max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single_device[1])))
    assert moved < PARAM_ATOL, f"adapters differ by up to {moved:.2e}"
    changed = max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(adapters)))
    assert changed > 1e-3, "the adapters should have moved"
    a = sharded[2].params["layers"]["mlp"]["up_proj_lora"]["a"]  # [layers, embed, lora_rank]
    b = sharded[2].params["layers"]["mlp"]["up_proj_lora"]["b"]  # [layers, lora_rank, mlp]
    assert a.sharding.spec == P(None, "fsdp", None) and b.sharding.spec == P(None, None, "tensor")
    assert sharded[3].base["layers"]["mlp"]["up_proj"].sharding.spec == P(None, "fsdp", "tensor")
