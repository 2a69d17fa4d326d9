"""Checkpoints: the train state and the data iterator round-trip exactly (onto another mesh too),
`load_model_params` reads only the parameters, and all of it works on gs:// (the local GCS emulator)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from agentlm_jax.config import DataConfig
from agentlm_jax.data import iterator
from agentlm_jax.training.checkpointing import Checkpointer, load_model_params, tokenizer_path
from agentlm_jax.config import OptimizerConfig, to_dict
from agentlm_jax.model.llama import Llama
from agentlm_jax.training.optimizer import make_optimizer
from agentlm_jax.config import DEFAULT_RULES, MeshConfig
from agentlm_jax.sharding import make_mesh, state_shardings
from agentlm_jax.training.state import abstract_params, abstract_train_state, init_train_state, train_state_shardings
from tests.helpers.training import BATCH, SEQ, TINY_MODEL, tiny_config, write_dataset

OPTIMIZER = make_optimizer(OptimizerConfig(), 10, abstract_params(TINY_MODEL))


def random_state(mesh):
    """A train state whose every leaf (moments and counters included) holds distinct random values."""
    shardings = train_state_shardings(TINY_MODEL, OPTIMIZER, mesh, DEFAULT_RULES)
    params = jax.device_get(nnx.state(Llama(TINY_MODEL, rngs=nnx.Rngs(1)), nnx.Param).to_pure_dict())
    state = init_train_state(params, OPTIMIZER)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: np.asarray(rng.integers(1, 100, np.shape(x)) if np.issubdtype(np.asarray(x).dtype,
                                              np.integer) else rng.standard_normal(np.shape(x)), np.asarray(x).dtype),
                         state)
    return jax.device_put(state, shardings), shardings


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


def train_data(data_dir):
    return iterator.train_iterator(DataConfig(path=data_dir, global_batch=BATCH, max_seq_len=SEQ), seed=3,
                                   process_index=0, process_count=1)


def save_and_restore(directory, data_dir, ocdbt=True, save_mesh=MeshConfig(fsdp=8)):
    """Save a random state (fsdp=8) and a data iterator 2 batches in; restore onto fsdp=4 x tensor=2."""
    state, _ = random_state(make_mesh(save_mesh))
    data = train_data(data_dir)
    try:
        next(data), next(data)
        run_info = {"config": to_dict(tiny_config(data_dir, directory)), "tokenizer_path": "/the/tokenizer"}
        with Checkpointer(directory, keep=2, ocdbt=ocdbt) as ckpt:
            ckpt.save(7, state, data, run_info)
            ckpt.wait_until_finished()
        expected_next = next(data)
    finally:
        data.close()

    other_mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    shardings = train_state_shardings(TINY_MODEL, OPTIMIZER, other_mesh, DEFAULT_RULES)
    fresh = train_data(data_dir)
    try:
        with Checkpointer(directory) as ckpt:
            assert ckpt.latest_step() == 7
            restored = ckpt.restore(7, abstract_train_state(shardings, TINY_MODEL, OPTIMIZER), fresh)
        got_next = next(fresh)
    finally:
        fresh.close()
    return state, restored, shardings, expected_next, got_next


def assert_restored_exactly(state, restored, shardings, expected_next, got_next):
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding, "restored onto the requested (different) mesh layout"
    for key in expected_next:
        np.testing.assert_array_equal(got_next[key], expected_next[key], err_msg=f"data iterator: {key}")


def test_state_and_data_iterator_round_trip_exactly_onto_another_mesh(tmp_path, data_dir):
    assert_restored_exactly(*save_and_restore(str(tmp_path / "checkpoints"), data_dir))


def test_load_model_params_reads_the_parameters_of_a_run(tmp_path, data_dir):
    state, _, _, _, _ = save_and_restore(str(tmp_path / "run" / "checkpoints"), data_dir)
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints"):  # the run dir or its checkpoints dir
        cfg, params = load_model_params(str(where))
        assert cfg == TINY_MODEL and isinstance(params, nnx.State)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params.to_pure_dict())):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    _, params = load_model_params(str(tmp_path / "run"), step=7,
                                  shardings=lambda abstract: state_shardings(abstract, mesh, DEFAULT_RULES))
    assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert tokenizer_path(str(tmp_path / "run")) == "/the/tokenizer"
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 .* available steps: \[7\]"):
        load_model_params(str(tmp_path / "run"), step=3)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_model_params(str(tmp_path / "empty"))


def test_checkpoints_and_data_on_gcs(gcs, data_dir):
    """ocdbt=false: the emulator returns no object generation on reads, which OCDBT's read-modify-write of its
    manifest needs (about 1 save in 4 fails with it on); real GCS does. Saved replicated (data=8: one file per
    array instead of eight; the emulator serves one request at a time), restored sharded."""
    gcs_bucket = gcs
    gcs_data = write_dataset(f"{gcs_bucket}/checkpoint-test-data", train=60, validation=6)
    assert_restored_exactly(*save_and_restore(f"{gcs_bucket}/checkpoint-test/checkpoints", gcs_data, ocdbt=False,
                                              save_mesh=MeshConfig(data=8, fsdp=1)))
    cfg, _ = load_model_params(f"{gcs_bucket}/checkpoint-test")
    assert cfg == TINY_MODEL
