"""Sharding: logical axes → mesh by one rules table; a sharded forward equals the single-device one."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from agentlm_jax import sharding
from agentlm_jax.hf import import_hf, load_hf_model
from agentlm_jax.model.llama import abstract_model
from tests.helpers.hf import SMALL, random_tokens, single_segment_inputs


def test_state_shardings_follow_the_rules_table():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    state = nnx.state(abstract_model(SMALL["gqa"]), nnx.Param)
    specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, mesh).to_pure_dict())
    assert specs["layers"]["attn"]["q_proj"] == P(None, "fsdp", "tensor", None)  # layers, embed, heads, head_dim
    assert specs["layers"]["attn"]["k_proj"] == P(None, "fsdp", "tensor", None)  # 2 KV heads over tensor=2
    assert specs["layers"]["mlp"]["down_proj"] == P(None, "tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert specs["embedder"]["embedding"] == P("tensor", "fsdp")
    assert specs["final_norm"]["scale"] == P(None)
    # A different layout is a rules change only: e.g. no tensor parallelism for the MLP.
    rules = tuple((k, None if k == "mlp" else v) for k, v in sharding.DEFAULT_RULES)
    specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, mesh, rules).to_pure_dict())
    assert specs["layers"]["mlp"]["down_proj"] == P(None, None, "fsdp")


def test_indivisible_dimensions_are_replicated():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
    state = nnx.state(abstract_model(SMALL["gqa"]), nnx.Param)  # 2 KV heads cannot split over tensor=4
    specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, mesh).to_pure_dict())
    assert specs["layers"]["attn"]["k_proj"] == P(None, "fsdp", None, None)
    assert specs["layers"]["attn"]["q_proj"] == P(None, "fsdp", "tensor", None)


@pytest.mark.parametrize("mesh_config", [sharding.MeshConfig(data=1, fsdp=4, tensor=2),
                                         sharding.MeshConfig(data=2, fsdp=2, tensor=2)])
def test_sharded_forward_equals_single_device(hf_checkpoints, mesh_config):
    cfg, _, path = hf_checkpoints["gqa"]
    mesh = sharding.make_mesh(mesh_config)
    _, params = import_hf(path, mesh=mesh, show_progress=False)
    # every parameter landed directly on its sharding, each device holding only its slice
    q = params["layers"]["attn"]["q_proj"][...]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (cfg.num_layers, 64 // mesh_config.fsdp, 4 // 2, 16)

    graphdef, _ = nnx.split(abstract_model(cfg))
    sharded_model = nnx.merge(graphdef, params)
    _, single_model = load_hf_model(path, show_progress=False)
    tokens = random_tokens(cfg, 4, 24, seed=11)
    positions, segment_ids = single_segment_inputs(tokens)

    @nnx.jit
    def sharded_forward(model, tokens, positions, segment_ids):
        with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
            return model(tokens, positions, segment_ids)

    batch = jax.device_put((tokens, positions, segment_ids), sharding.logical_sharding(("batch", "seq"), mesh,
                                                                                       sharding.DEFAULT_RULES))
    out = sharded_forward(sharded_model, *batch)
    assert out.sharding.spec[0] in (("data", "fsdp"), "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(single_model(tokens, positions, segment_ids)), atol=2e-5)
