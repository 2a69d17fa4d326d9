"""Damaged checkpoints: every saved file's size and CRC32C are checked before a read; a truncated, emptied or
bit-flipped file is named, a resume falls back to the previous step (and says so), readers refuse a damaged
step, and a run with no intact checkpoint stops with a clear error."""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from agentlm_jax.config import DEFAULT_RULES, MeshConfig, to_dict
from agentlm_jax.errors import SetupError
from agentlm_jax.sharding import make_mesh
from agentlm_jax.training import checkpointing
from agentlm_jax.training.checkpointing import CHECKSUMS, DAMAGED_SUBDIR, CheckpointDamagedError, Checkpointer, \
    NoUsableCheckpointError, load_model_params
from agentlm_jax.training.state import abstract_train_state, train_state_shardings
from tests.helpers.training import TINY_MODEL, tiny_config, write_dataset
from tests.training.test_checkpoint import OPTIMIZER, random_state, train_data

LOGGER = "agentlm_jax.training.checkpointing"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_dir):
    """Checkpoints of steps 1 and 2 (different states, the iterator 1 and 2 batches in), and what each holds."""
    root = str(tmp_path_factory.mktemp("saved") / "checkpoints")
    state1, _ = random_state(make_mesh(MeshConfig(fsdp=8)))
    state2 = jax.tree.map(lambda x: x + 1, state1)
    run_info = {"config": to_dict(tiny_config(data_dir, root)), "tokenizer_path": "/the/tokenizer"}
    data = train_data(data_dir)
    expected_next = {}
    try:
        next(data)
        with Checkpointer(root, keep=3) as ckpt:
            for step, state in ((1, state1), (2, state2)):
                ckpt.save(step, state, data, run_info)
                ckpt.wait_until_finished()
                expected_next[step] = next(data)
    finally:
        data.close()
    return root, {1: state1, 2: state2}, expected_next


def abstract():
    shardings = train_state_shardings(TINY_MODEL, OPTIMIZER, make_mesh(MeshConfig(fsdp=8)), DEFAULT_RULES)
    return abstract_train_state(shardings, TINY_MODEL, OPTIMIZER)


@pytest.fixture
def run(tmp_path, saved):
    """A copy of the saved checkpoints to damage."""
    root, states, expected_next = saved
    copy = str(tmp_path / "checkpoints")
    shutil.copytree(root, copy)
    return copy, states, expected_next


def largest_array_file(root, step, item="params"):
    files = glob.glob(f"{root}/{step}/{item}/ocdbt.process_0/d/*")
    assert files, f"no OCDBT data files under {root}/{step}/{item}"
    return max(files, key=os.path.getsize)


def truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def assert_state(restored, expected):
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def resume(root, data_dir, **kwargs):
    data = train_data(data_dir)
    try:
        with Checkpointer(root, **kwargs) as ckpt:
            restored = ckpt.restore_latest(abstract(), data)
            steps = ckpt.all_steps()
        return restored, next(data), steps
    finally:
        data.close()


def assert_batch(got, expected):
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_every_saved_file_has_a_checksum_and_an_intact_checkpoint_resumes_exactly(run, data_dir):
    root, states, expected_next = run
    for step in (1, 2):
        assert os.path.exists(f"{root}/{step}/{CHECKSUMS}")
    restored, got_next, steps = resume(root, data_dir)
    assert restored.step == 2 and steps == [1, 2]
    assert_state(restored.state, states[2])
    assert_batch(got_next, expected_next[2])


def test_a_truncated_array_file_falls_back_to_the_previous_step_naming_the_file(run, data_dir, caplog):
    root, states, expected_next = run
    damaged = largest_array_file(root, 2)
    truncate(damaged)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restored, got_next, steps = resume(root, data_dir, keep=3)
    assert restored.step == 1
    assert_state(restored.state, states[1])
    assert_batch(got_next, expected_next[1])  # the data iterator is at step 1's position, too
    warnings = caplog.text
    assert damaged in warnings and "truncated" in warnings and "previous checkpoint (step 1)" in warnings
    assert "resumed from the checkpoint of step 1" in warnings
    # the damaged step is moved aside, so the resumed run can save step 2 again
    assert steps == [1]
    assert glob.glob(f"{root}/{DAMAGED_SUBDIR}/2-*/params")
    with Checkpointer(root, keep=3) as ckpt:
        ckpt.save(2, states[2], None, {"config": {}})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2] and ckpt.verify(2, ("params", "optimizer"))


def test_a_flipped_byte_is_detected_and_named(run):
    root, _, _ = run
    damaged = largest_array_file(root, 2, "optimizer")
    flip_byte(damaged)
    with Checkpointer(root, read_only=True) as ckpt, pytest.raises(CheckpointDamagedError) as e:
        ckpt.restore(2, abstract())
    assert damaged in str(e.value) and "does not match the checksum saved with it" in str(e.value)
    assert isinstance(e.value, SetupError)  # the CLIs print it as one `error:` line


def test_an_emptied_data_iterator_state_is_named_and_the_previous_step_used(run, data_dir, caplog):
    root, states, expected_next = run
    damaged = f"{root}/2/data/process_0-of-1.json"
    truncate(damaged, 0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restored, got_next, _ = resume(root, data_dir)
    assert restored.step == 1 and damaged in caplog.text and "has 0 bytes" in caplog.text
    assert_batch(got_next, expected_next[1])


def test_every_checkpoint_damaged_is_a_clear_error(run, data_dir):
    root, _, _ = run
    first, second = largest_array_file(root, 1), f"{root}/2/data/process_0-of-1.json"
    truncate(first)
    os.remove(second)
    with pytest.raises(NoUsableCheckpointError) as e:
        resume(root, data_dir)
    message = str(e.value)
    assert f"no usable checkpoint in {root}" in message and first in message and f"{second} is missing" in message
    assert "move the step directories away" in message
    assert sorted(os.listdir(root)) == ["1", "2"], "nothing is moved when nothing could be restored"


def test_readers_verify_the_parameters(run, caplog):
    root, states, _ = run
    damaged = largest_array_file(root, 2)
    flip_byte(damaged)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, params = load_model_params(root)  # the latest intact step
    assert damaged in caplog.text
    assert_state(params.to_pure_dict(), states[1].params)
    with pytest.raises(CheckpointDamagedError, match=f"step 2 is damaged: {damaged} does not match"):
        load_model_params(root, step=2)
    assert sorted(os.listdir(root)) == ["1", "2"], "a reader moves nothing"


def test_a_checkpoint_without_checksums_is_read_unverified_and_an_unreadable_one_skipped(run, data_dir, caplog):
    """Steps saved before checksums existed: read with a warning; if orbax or grain cannot read one, it is
    damaged like any other."""
    root, states, expected_next = run
    for step in (1, 2):
        os.remove(f"{root}/{step}/{CHECKSUMS}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restored, _, _ = resume(root, data_dir)
    assert restored.step == 2 and "reading it unverified" in caplog.text
    assert_state(restored.state, states[2])

    truncate(f"{root}/2/data/process_0-of-1.json", 0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restored, got_next, _ = resume(root, data_dir)
    assert restored.step == 1 and f"{root}/2 cannot be read" in caplog.text
    assert_batch(got_next, expected_next[1])


def test_damage_on_gcs_is_detected_from_the_object_metadata(gcs, data_dir, monkeypatch):
    """On gs:// the saved CRC32C is GCS's own (no bytes are read back); an object rewritten shorter is found."""
    import fsspec

    def read_back(*args):
        raise AssertionError("on gs:// the CRC32C comes from the object metadata")

    monkeypatch.setattr(checkpointing, "_crc32c_of_file", read_back)
    root = f"{gcs}/integrity-test/checkpoints"
    state, _ = random_state(make_mesh(MeshConfig(data=8, fsdp=1)))
    with Checkpointer(root, ocdbt=False, async_save=False) as ckpt:
        ckpt.save(3, state, None, {"config": {}})
        assert ckpt.verify(3, ("params", "optimizer", "config"))
    fs, path = fsspec.core.url_to_fs(f"{root}/3/params")
    victim = max((p for p in fs.find(path) if "/." not in p and "_" not in p.rsplit("/", 1)[-1]),
                 key=lambda p: fs.size(p))
    fs.pipe_file(victim, fs.cat_file(victim)[:-4])
    with Checkpointer(root, read_only=True) as ckpt, pytest.raises(CheckpointDamagedError, match="truncated"):
        ckpt.verify(3, ("params",))


def test_the_newest_step_with_an_intact_config_is_found_without_reading_the_arrays(run, monkeypatch, caplog):
    """What the trainer checks at start-up (the saved config of the step it will resume): only config/ is read."""
    root, _, _ = run
    damaged = f"{root}/2/config/metadata"
    flip_byte(damaged)
    read = []
    original = checkpointing._crc32c_of_file
    monkeypatch.setattr(checkpointing, "_crc32c_of_file", lambda fs, path: read.append(path) or original(fs, path))
    with Checkpointer(root) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt.usable_step(items=("config",)) == 1
        assert ckpt.run_info(1)["tokenizer_path"] == "/the/tokenizer"
        with pytest.raises(CheckpointDamagedError, match=damaged):
            ckpt.run_info(2)
    assert damaged in caplog.text and "Trying the previous checkpoint (step 1)" in caplog.text
    assert read and all("/config/" in path for path in read)
