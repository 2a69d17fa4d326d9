"""Which implementation ops picks per backend, and that tracing for GPU or TPU never reaches the CPU kernels:
the jaxpr of the real train step's forward pass (model + masked chunked loss) is searched for them by name."""

import jax
import numpy as np
import pytest
from flax import nnx

from agentlm_jax import ops
from agentlm_jax.config import DEFAULT_RULES, DataConfig, LossConfig, MeshConfig, ModelConfig, OptimizerConfig
from agentlm_jax.model.llama import Llama
from agentlm_jax.ops import backend as choice
from agentlm_jax.sharding import make_mesh
from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
from agentlm_jax.training.state import abstract_params, train_state_shardings
from agentlm_jax.training.step import TrainStep

# The custom-VJP kernels of ops/cpu/, as their names appear in a jaxpr.
CPU_KERNELS = ("name=_matmul", "name=blockwise_attention", "name=first_chunks_nll", "name=permute")


def test_the_choice_per_backend():
    assert [choice.projection_impl(p) for p in ("cpu", "gpu", "cuda", "tpu")] == ["matmul_2d", "einsum", "einsum",
                                                                                     "einsum"]
    assert {p: choice.attention_impl("auto", p, cached=False) for p in ("cpu", "gpu", "tpu")} == {
        "cpu": "blockwise", "gpu": "default", "tpu": "splash"}  # default: dot_product_attention picks (cuDNN)
    assert {p: choice.attention_impl("auto", p, cached=True) for p in ("cpu", "gpu", "tpu")} == {
        "cpu": "xla", "gpu": "default", "tpu": "xla"}  # blockwise and splash have no KV-cache path
    assert choice.attention_impl("blockwise", "tpu", cached=False) == "blockwise"  # asked for by name
    assert choice.attention_impl("flash", "gpu", cached=False) == "flash"  # the Pallas GPU kernel: by name only
    assert choice.attention_impl("flash", "gpu", cached=True) == "default"
    assert choice.attention_impl("xla", "cpu", cached=False) == "xla"
    assert [choice.cross_entropy_impl(p) for p in ("cpu", "gpu", "tpu")] == ["cpu_fused", "scan", "scan"]


def test_the_platform_is_the_meshs_inside_activation_sharding():
    from agentlm_jax.sharding import activation_sharding

    assert ops.current_platform() == "cpu"
    with ops.platform("tpu"):
        assert ops.current_platform() == "tpu"
    with activation_sharding(make_mesh(MeshConfig(fsdp=2), jax.devices()[:2]), DEFAULT_RULES):
        assert ops.current_platform() == "cpu"


def traced_forward(platform: str) -> str:
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128)
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(), 10, abstract_params(cfg))
    step = TrainStep(cfg, optimizer, learning_rate_schedule(OptimizerConfig(), 10), mesh=mesh, rules=DEFAULT_RULES,
                     state_shardings=train_state_shardings(cfg, optimizer, mesh, DEFAULT_RULES),
                     data=DataConfig(global_batch=2, max_seq_len=128), loss=LossConfig(impl="chunked", chunk_size=16))
    params = nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    batch = {k: np.ones((2, 128), np.int32) for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids",
                                                        "is_agent", "task_ids")}
    with ops.platform(platform):
        return str(jax.make_jaxpr(step.token_nll)(params, batch))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_other_backends_trace_none_of_the_cpu_kernels(platform):
    cpu, other = traced_forward("cpu"), traced_forward(platform)
    assert all(name in cpu for name in CPU_KERNELS), "the search must find the kernels where they are used"
    assert not [name for name in CPU_KERNELS if name in other]
    assert ("pallas_call" in other) == (platform == "tpu")  # the splash kernel, on TPU only
