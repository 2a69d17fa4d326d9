"""Where the train step's memory goes (issue #10, "investigate temporaries"), checked on a small AOT-compiled
v5e step: the optimizer update is done in place (every leaf of the donated state is aliased to its output, so
no second copy of the parameters or the AdamW moments is ever a temporary)."""

import math

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="libtpu (the test extra's jax[tpu]) is not installed")

from agentlm_jax.aot import abstract_batch, compile_train_step, tpu_devices  # noqa: E402
from agentlm_jax.config import load_config  # noqa: E402
from agentlm_jax.sharding import make_mesh  # noqa: E402
from agentlm_jax.training.optimizer import make_optimizer  # noqa: E402
from agentlm_jax.training.state import abstract_params, abstract_train_state, train_state_shardings  # noqa: E402

MODEL = ["model.vocab_size=1152", "model.hidden_size=512", "model.intermediate_size=1024", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=512", "model.dtype=bfloat16"]


@pytest.fixture(scope="module")
def case():
    cfg = load_config(None, [*MODEL, "data.max_seq_len=512", "data.global_batch=8", "loss.chunk_size=128",
                             "mesh.fsdp=4"])
    devices = tpu_devices("v5e:2x2")
    mesh = make_mesh(cfg.mesh, devices)
    optimizer = make_optimizer(cfg.optimizer, cfg.steps, abstract_params(cfg.model))
    state = abstract_train_state(train_state_shardings(cfg.model, optimizer, mesh, cfg.mesh.rules), cfg.model,
                                 optimizer)
    return cfg, state, compile_train_step(cfg, devices), abstract_batch(cfg, mesh, cfg.mesh.rules)


def _shard_bytes(leaves) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


def test_the_state_is_updated_in_place(case):
    _, state, report, _ = case
    leaves = jax.tree.leaves(state)
    # One input_output_alias entry per state leaf (parameters, both moments, counters): the new parameters and
    # moments are written over the donated ones.
    aliases = report.hlo.split("input_output_alias={", 1)[1].split("}, entry_computation_layout", 1)[0]
    assert aliases.count("may-alias") + aliases.count("must-alias") == len(leaves)
    # TPU buffers are padded (a scalar takes 512 bytes): allow that much per leaf.
    state_bytes = _shard_bytes(leaves)
    assert state_bytes <= report.memory.alias_size_in_bytes <= state_bytes + 512 * len(leaves)
