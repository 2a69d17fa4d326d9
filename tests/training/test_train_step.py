"""The jitted train step: sharded runs equal the single-device run, gradient accumulation equals one big batch,
bf16 compute keeps float32 master weights, the state is donated.

Tolerances: float32 everywhere. Per-step losses agree to rtol 2e-6 (only the summation order differs
between layouts). Parameters after 3 AdamW steps at learning rate 1e-3 agree to atol 2e-5, 2 % of one
step's largest move: Adam divides each gradient by its own running RMS, so a coordinate whose gradient is
nearly rounding noise still moves by up to lr per step, and amplifies the layouts' rounding differences there
(measured: up to 1.4e-5 on one MLP weight; every other tensor within 2e-6). A real error (a missing
all-reduce, a wrong shard) moves parameters by the order of lr = 1e-3.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from agentlm_jax.config import DEFAULT_RULES, DataConfig, LossConfig, MeshConfig, OptimizerConfig
from agentlm_jax.data import iterator
from agentlm_jax.data.packing import BATCH_KEYS
from agentlm_jax.model.llama import Llama
from agentlm_jax.sharding import make_mesh
from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
from agentlm_jax.training.state import abstract_params, init_train_state, train_state_shardings
from agentlm_jax.training.step import TrainStep, check_batch_layout
from tests.helpers.training import BATCH, SEQ, TINY_MODEL, write_dataset

STEPS = 3
LR = 1e-3
LOSS_RTOL = 2e-6
PARAM_ATOL = 2e-5


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Real packed batches (several conversations per row, padding) from the input pipeline."""
    data_dir = write_dataset(str(tmp_path_factory.mktemp("data")))
    it = iterator.train_iterator(DataConfig(path=data_dir, global_batch=BATCH * 4, max_seq_len=SEQ), seed=0,
                                 process_index=0, process_count=1)
    out = [next(it) for _ in range(STEPS)]
    it.close()
    assert all(b["segment_ids"].max() > 1 for b in out), "rows should hold several conversations"
    return out


@pytest.fixture(scope="module")
def initial_params():
    return jax.device_get(nnx.state(Llama(TINY_MODEL, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())


def train(initial_params, batches, mesh_cfg: MeshConfig, *, model_cfg=TINY_MODEL, micro_batches=1, rows=BATCH,
          loss_impl="full", chunk=None):
    """(per-step losses, final params on the host, final state) of STEPS steps on the first `rows` rows."""
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    mesh = make_mesh(mesh_cfg, jax.devices()[:n])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, warmup_fraction=0.0), 10, abstract_params(model_cfg))
    shardings = train_state_shardings(model_cfg, optimizer, mesh, DEFAULT_RULES)
    check_batch_layout(rows, micro_batches, mesh, DEFAULT_RULES)
    state = jax.device_put(init_train_state(initial_params, optimizer), shardings)
    step = TrainStep(model_cfg, optimizer, learning_rate_schedule(OptimizerConfig(learning_rate=LR), 10), mesh=mesh,
                     rules=DEFAULT_RULES, state_shardings=shardings,
                     data=DataConfig(global_batch=rows, max_seq_len=SEQ, micro_batches=micro_batches),
                     loss=LossConfig(impl=loss_impl, chunk_size=chunk))
    losses = []
    for batch in batches:
        state, metrics = step(state, {k: batch[k][:rows] for k in BATCH_KEYS})
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device(initial_params, batches, compilation_cache):
    return train(initial_params, batches, MeshConfig(data=1, fsdp=1, tensor=1))


def assert_same_training(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=LOSS_RTOL)
    moved = max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])))
    assert moved < PARAM_ATOL, f"parameters differ by up to {moved:.2e}"


@pytest.mark.parametrize("mesh_cfg, loss_impl", [
    (MeshConfig(data=1, fsdp=8, tensor=1), "full"),
    (MeshConfig(data=1, fsdp=4, tensor=2), "vocab_parallel"),
    (MeshConfig(data=2, fsdp=2, tensor=2), "vocab_parallel"),
], ids=["fsdp8", "fsdp4-tensor2", "data2-fsdp2-tensor2"])
def test_sharded_training_equals_one_device(initial_params, batches, single_device, mesh_cfg, loss_impl):
    sharded = train(initial_params, batches, mesh_cfg, loss_impl=loss_impl)
    assert_same_training(sharded, single_device)
    kernel = sharded[2].params["layers"]["mlp"]["up_proj"]  # [layers, embed, mlp]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    moments = [x for path, x in jax.tree_util.tree_leaves_with_path(sharded[2].opt_state)
               if jax.tree_util.keystr(path).endswith("['layers']['mlp']['up_proj']")]
    assert len(moments) == 2 and all(x.sharding == kernel.sharding for x in moments), "Adam's mu and nu"


def test_tied_embeddings_and_qkv_biases_train_sharded_as_on_one_device(batches):
    """Qwen 2.5-style (q/k/v biases, the output head = the embedding table): the vocabulary-parallel loss over
    the tied table and the biases' gradients, sharded over fsdp x tensor, equal one device."""
    import dataclasses

    cfg = dataclasses.replace(TINY_MODEL, architecture="qwen2", tie_word_embeddings=True)
    params = jax.device_get(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())
    assert "lm_head" not in params and "q_bias" in params["layers"]["attn"]
    one = train(params, batches, MeshConfig(data=1, fsdp=1, tensor=1), model_cfg=cfg)
    assert_same_training(train(params, batches, MeshConfig(data=1, fsdp=4, tensor=2), model_cfg=cfg,
                               loss_impl="vocab_parallel"), one)
    assert np.abs(one[1]["layers"]["attn"]["q_bias"] - params["layers"]["attn"]["q_bias"]).max() > 1e-4


def test_gradient_accumulation_equals_one_big_batch(initial_params, batches, single_device):
    fsdp8 = MeshConfig(data=1, fsdp=8, tensor=1)
    big = train(initial_params, batches, fsdp8, rows=4 * BATCH)
    accumulated = train(initial_params, batches, fsdp8, rows=4 * BATCH, micro_batches=4, chunk=16,
                        loss_impl="chunked")
    assert_same_training(accumulated, big)
    assert np.abs(big[0] - single_device[0]).max() > 1e-3, \
        "the test needs the 4x batch to give a different result from its first quarter"


def test_bf16_compute_keeps_float32_master_weights(initial_params, batches, single_device):
    bf16 = train(initial_params, batches, MeshConfig(data=1, fsdp=1, tensor=1),
                 model_cfg=TINY_MODEL.replace(dtype="bfloat16"))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16[1]))
    np.testing.assert_allclose(bf16[0], single_device[0], rtol=2e-2)
    assert not np.array_equal(bf16[0], single_device[0]), "bf16 compute should round differently"


def test_train_step_donates_the_previous_state(initial_params, batches, single_device):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR), 10, abstract_params(TINY_MODEL))
    shardings = train_state_shardings(TINY_MODEL, optimizer, mesh, DEFAULT_RULES)
    state = jax.device_put(init_train_state(initial_params, optimizer), shardings)
    step = TrainStep(TINY_MODEL, optimizer, learning_rate_schedule(OptimizerConfig(), 10), mesh=mesh,
                     rules=DEFAULT_RULES, state_shardings=shardings)
    new_state, _ = step(state, {k: batches[0][k][:BATCH] for k in BATCH_KEYS})
    assert state.params["lm_head"]["kernel"].is_deleted() and int(new_state.step) == 1
