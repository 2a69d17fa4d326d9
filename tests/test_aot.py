"""Ahead-of-time compilation of the real train step for TPU slices (libtpu, no TPU): it compiles for several
generations and meshes; each chip holds exactly its shard of the parameters and the optimizer state (a silently
replicated parameter or moment would show); the splash kernel is in the program; the vocabulary-parallel loss
never gathers full-vocabulary logits; rematerialisation and micro-batches lower the temporary memory."""

import math
import re

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="libtpu (the test extra's jax[tpu]) is not installed")

from agentlm_jax.aot import abstract_batch, compile_train_step, tpu_devices  # noqa: E402
from agentlm_jax.config import load_config  # noqa: E402
from agentlm_jax.sharding import make_mesh  # noqa: E402
from agentlm_jax.training.optimizer import make_optimizer  # noqa: E402
from agentlm_jax.training.state import abstract_params, abstract_train_state, train_state_shardings  # noqa: E402

V = 1152  # a vocabulary no other dimension shares, so it can be looked for in the HLO
MODEL = [f"model.vocab_size={V}", "model.hidden_size=512", "model.intermediate_size=1024", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=512", "model.dtype=bfloat16"]


def config(*overrides):
    return load_config(None, [*MODEL, "data.max_seq_len=512", "data.global_batch=8", "loss.chunk_size=128",
                              *overrides])


def expected_argument_bytes(cfg, devices) -> int:
    """Per chip: the shard of every state leaf (parameters, moments, counters) plus its rows of the batch."""
    mesh = make_mesh(cfg.mesh, devices)
    optimizer = make_optimizer(cfg.optimizer, cfg.steps, abstract_params(cfg.model))
    state = abstract_train_state(train_state_shardings(cfg.model, optimizer, mesh, cfg.mesh.rules), cfg.model,
                                 optimizer)
    leaves = jax.tree.leaves(state) + list(abstract_batch(cfg, mesh, cfg.mesh.rules).values())
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


@pytest.fixture(scope="module")
def v5e():
    return tpu_devices("v5e:2x2")


@pytest.fixture(scope="module")
def fsdp4(v5e):
    return compile_train_step(config("mesh.fsdp=4"), v5e)


@pytest.mark.parametrize("topology, mesh", [
    ("v4:2x2x1", ["mesh.fsdp=2", "mesh.tensor=2"]),
    ("v5p:2x2x1", ["mesh.data=2", "mesh.fsdp=2"]),
])
def test_compiles_for_other_generations_and_meshes(topology, mesh):
    devices = tpu_devices(topology)
    cfg = config(*mesh)
    report = compile_train_step(cfg, devices)
    expected = expected_argument_bytes(cfg, devices)
    assert 0.98 * expected <= report.memory.argument_size_in_bytes <= 1.1 * expected, (report.memory, expected)
    assert "splash" in report.hlo.lower()


def test_each_chip_holds_only_its_shard_and_the_splash_kernel_runs(fsdp4, v5e):
    expected = expected_argument_bytes(config("mesh.fsdp=4"), v5e)
    got = fsdp4.memory.argument_size_in_bytes
    assert 0.98 * expected <= got <= 1.1 * expected, f"{got} bytes per chip, the shards add up to {expected}"
    replicated = expected_argument_bytes(config("mesh.fsdp=4", "mesh.rules=[[batch, [data, fsdp]]]"), v5e)
    assert replicated > 1.5 * got  # what a replicated state would cost: the check above would catch it
    assert "splash" in fsdp4.hlo.lower() and fsdp4.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}


def test_the_vocab_parallel_loss_never_gathers_full_vocabulary_logits(v5e):
    report = compile_train_step(config("mesh.fsdp=2", "mesh.tensor=2"), v5e)
    assert report.loss_impl == "vocab_parallel"
    results = [line.split("=", 1)[1].split("all-gather")[0] for line in report.hlo.splitlines()
               if re.search(r"\ball-gather(-start)?\(", line)]
    assert results, "fsdp gathers parameters: the search must find all-gathers at all"
    # Logits have a batch and a position dimension besides the vocabulary ([B,T,V], or [rows,chunk,V]); the
    # embedding table [V,D] may be gathered for the lookup.
    shapes = [[int(d) for d in m.split(",")] for r in results for m in re.findall(r"\[([\d,]+)\]", r)]
    logits = [shape for shape in shapes if len(shape) >= 3 and V in shape]
    assert not logits, f"full-vocabulary logits gathered: {logits[:3]}"


def test_remat_and_micro_batches_lower_temporary_memory(v5e):
    """With activations that dominate (8 rows of 512 per chip, 4 layers): keeping only each block's input, or
    taking the batch in 4 pieces, must need less temporary memory than keeping everything at once."""
    activations = ["mesh.fsdp=4", "data.global_batch=32", "model.num_layers=4"]
    temp = {name: compile_train_step(config(*activations, *extra), v5e).memory.temp_size_in_bytes
            for name, extra in (("base", []), ("remat", ["model.remat=full"]), ("micro", ["data.micro_batches=4"]))}
    assert temp["remat"] < temp["base"] and temp["micro"] < temp["base"], temp


def test_an_unknown_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown TPU topology 'v9:2x2'"):
        tpu_devices("v9:2x2")


@pytest.mark.slow
@pytest.mark.parametrize("config_name, slice_, overrides", [
    ("llama2-7b", "v5e-16", ["data.micro_batches=4"]),
    ("llama2-7b", "v4-32", []),
    ("llama2-13b", "v4-64", []),
    ("llama2-13b", "v5e-64", []),
    ("llama2-70b", "v5p-128", []),
    ("llama2-70b", "v5e-256", []),
    ("llama3.1-8b", "v4-32", []),  # (v5e-16 does not fit them, even with 4 micro-batches)
    ("llama3.1-8b", "v5e-32", []),
    ("qwen2.5-7b", "v5e-32", []),
    ("qwen2.5-7b", "v4-32", []),
])
def test_each_shipped_config_fits_the_slice_its_comment_names(config_name, slice_, overrides):
    """configs/llama2-*.yaml (global batch 64 x 4096, remat full, bf16 compute, float32 master weights and
    AdamW moments) on the slices their comments name, with the overrides named there, must fit the chips'
    HBM with 5 % to spare (the planner's figures of 2026-12-02 are in docs/tpu.md). 2-20 minutes each on
    2 cores (the 70B steps take longest)."""
    from agentlm_jax.aot import HBM_GIB, topology_name

    from tests.conftest import REPO_ROOT

    cfg = load_config(str(REPO_ROOT / "configs" / f"{config_name}.yaml"), overrides)
    report = compile_train_step(cfg, tpu_devices(slice_))
    hbm = HBM_GIB[topology_name(slice_).split(":")[0]] * 2**30
    assert report.total_bytes <= 0.95 * hbm, (report.memory, report.total_bytes / 2**30)
    assert "splash" in report.hlo.lower()


def test_multislice_puts_the_data_axis_across_slices_and_compiles():
    """Two v5e 2x2 slices joined by DCN: each data index is one whole slice (fsdp stays on a slice's ICI), and
    the train step compiles for it; a mesh whose data axis cannot span the slices is refused."""
    devices = tpu_devices("v5e:2x2", slices=2)
    cfg = config("mesh.data=2", "mesh.fsdp=-1")
    mesh = make_mesh(cfg.mesh, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
    report = compile_train_step(cfg, devices)
    expected = expected_argument_bytes(cfg, devices)
    assert 0.98 * expected <= report.memory.argument_size_in_bytes <= 1.1 * expected
    with pytest.raises(ValueError, match=r"span 2 slices: mesh.data \(1\) must be a multiple of 2"):
        make_mesh(config("mesh.fsdp=-1").mesh, devices)
