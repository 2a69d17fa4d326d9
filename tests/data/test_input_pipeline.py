"""The trainer's input pipeline end to end: TFRecord shards (local and gs://) -> host-local packed batches.

Datasets are written here with `data_pipeline.formats.records` only. Each conversation's tokens name it:
token = 1000 * (record number + 1) + position, so every batch can be traced back to its records.
"""

import dataclasses
import json

import fsspec
import numpy as np
import pytest

from agentlm_jax.config import DataConfig, MeshConfig
from agentlm_jax.data import host_shard, iterator, packing
from agentlm_jax.sharding import make_mesh
from data_pipeline.formats import records

TASKS = ["db", "os", "sharegpt", "webshop"]
MAX_SEQ_LEN = 128


def make_records(split: str, count: int, seed: int, start: int = 0) -> list[records.Record]:
    rng = np.random.default_rng(seed)
    out = []
    for n in range(start, start + count):
        length = int(rng.integers(2, MAX_SEQ_LEN + 2))
        mask = (rng.random(length) < 0.5).astype(np.int32)
        task = TASKS[n % len(TASKS)]
        out.append(records.Record(1000 * (n + 1) + np.arange(length, dtype=np.int32), mask,
                                  "general" if task == "sharegpt" else "agent", task, f"{split}-{n}"))
    return out


def write_dataset(root: str, splits: dict[str, tuple[list[records.Record], int]]) -> None:
    """{split: (records, number of shards)} -> shards + manifest under `root` (local path or URL)."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    for split, (recs, num_shards) in splits.items():
        for i in range(num_shards):
            with fs.open(f"{path}/{records.shard_filename(split, i, num_shards)}", "wb") as f:
                records.write_tfrecord(f, (records.encode_example(r) for r in recs[i::num_shards]))
    with fs.open(f"{path}/{records.MANIFEST_NAME}", "w") as f:
        json.dump({"tasks": TASKS, "tokenizer": {"vocab_size": 1024}}, f)


TRAIN = make_records("train", 150, seed=0)
VALIDATION = make_records("validation", 37, seed=1, start=len(TRAIN))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dataset"))
    write_dataset(root, {"train": (TRAIN, 3), "validation": (VALIDATION, 2)})
    return root


def record_numbers(batch) -> list[int]:
    """Record numbers of the conversations in a batch, in row and segment order."""
    first = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    return (batch["tokens"][first] // 1000 - 1).tolist()


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def spearman(a, b) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}


def data_config(data_dir, **kw) -> DataConfig:
    return DataConfig(path=data_dir, **{"global_batch": 8, "max_seq_len": MAX_SEQ_LEN, **kw})


def train(data_dir, **kw):
    """The training iterator; keyword arguments are DataConfig fields or train_iterator's own."""
    args = dict(seed=0, process_index=0, process_count=1, packing_bins=16)
    args.update(kw)
    data = data_config(data_dir, **{k: v for k, v in args.items() if k in DATA_FIELDS})
    return iterator.train_iterator(data, **{k: v for k, v in args.items() if k not in DATA_FIELDS})


def validation(data_dir, packing_bins=None, **kw):
    return iterator.ValidationSet(data_config(data_dir, packing_bins=packing_bins), **kw)


def test_batch_arrays_follow_the_contract(data_dir):
    it = train(data_dir, process_index=1, process_count=2)
    batch = next(it)
    assert set(batch) == set(packing.BATCH_KEYS)
    for k, v in batch.items():
        assert v.dtype == np.int32 and v.shape == (4, MAX_SEQ_LEN), k
    assert it.tasks == TASKS
    real = batch["segment_ids"] > 0
    np.testing.assert_array_equal(batch["targets"][real], batch["tokens"][real] + 1)
    assert (batch["task_ids"][~real] == -1).all() and not batch["loss_mask"][~real].any()
    in_file_order = [n for shard in range(3) for n in range(len(TRAIN))[shard::3]]
    for n in record_numbers(batch):
        assert n in in_file_order[1::2], "host 1 of 2 must read only records 1, 3, 5, ... in file order"
        where = batch["tokens"] // 1000 - 1 == n
        assert (batch["task_ids"][where] == TASKS.index(TRAIN[n].task)).all()
        assert (batch["is_agent"][where] == (TRAIN[n].source == "agent")).all()


def test_two_hosts_read_disjoint_shares_that_cover_every_record_once(data_dir):
    shares = []
    for host in range(2):
        it = train(data_dir, num_epochs=1, process_index=host, process_count=2)
        shares.append([n for batch in it for n in record_numbers(batch)])
        assert it.counts["read"] == it.counts["kept"] == len(shares[-1])
    assert len(shares[0]) == len(set(shares[0])) and len(shares[1]) == len(set(shares[1])), "duplicates"
    assert not set(shares[0]) & set(shares[1]), "hosts overlap"
    assert sorted(shares[0] + shares[1]) == list(range(len(TRAIN))), "records lost"


def test_every_target_token_of_an_epoch_reaches_the_loss(data_dir):
    batches = list(train(data_dir, num_epochs=1))
    loss_tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    assert loss_tokens == sum(int(r.loss_mask.sum() - r.loss_mask[0]) for r in TRAIN)


def test_order_is_seeded_and_reshuffled_every_epoch(data_dir):
    def order(seed):
        return [n for batch in train(data_dir, seed=seed, num_epochs=2) for n in record_numbers(batch)]

    first = order(seed=7)
    assert first == order(seed=7), "same seed, different order"
    assert first != order(seed=8), "the seed is ignored"
    assert sorted(first) == sorted(list(range(len(TRAIN))) * 2)
    epoch0, epoch1 = first[:len(TRAIN)], first[len(TRAIN):]
    # Rank correlation of each record's place: ~1 for a repeated (or unshuffled) order, ~0 for a reshuffle.
    # (Packing only moves records within a group of rows, which keeps a repeated order near 1.)
    common = sorted(set(epoch0) & set(epoch1))
    assert len(common) > 0.9 * len(TRAIN)
    assert abs(spearman([epoch0.index(n) for n in common], [epoch1.index(n) for n in common])) < 0.4
    assert abs(spearman(range(len(epoch0)), epoch0)) < 0.4, "epoch 0 is in file order"


@pytest.mark.parametrize("skip", [3, 11])  # inside the first packed group of rows; after an epoch
def test_restoring_the_state_reproduces_the_following_batches(data_dir, skip):
    it = train(data_dir)
    take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 6)
    resumed = train(data_dir)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 6), expected)


def test_state_from_other_settings_is_refused(data_dir):
    state = train(data_dir).get_state()
    with pytest.raises(ValueError, match=r"seed: saved 0, now 1"):
        train(data_dir, seed=1).set_state(state)
    with pytest.raises(ValueError, match=r"process_count: saved 1, now 2"):
        train(data_dir, process_count=2).set_state(state)


def test_validation_is_finite_deterministic_and_equal_across_hosts(data_dir):
    hosts = [validation(data_dir, process_index=h, process_count=2, packing_bins=8) for h in range(2)]
    passes = [list(v) for v in hosts]
    assert len(passes[0]) == len(passes[1]) > 1, "hosts must run the same number of evaluation steps"
    seen = [n for p in passes for batch in p for n in record_numbers(batch)]
    assert sorted(seen) == [len(TRAIN) + i for i in range(len(VALIDATION))]
    assert sum(int(b["loss_mask"].sum()) for p in passes for b in p) == sum(
        int(r.loss_mask.sum() - r.loss_mask[0]) for r in VALIDATION)
    uncached = validation(data_dir, process_index=0, process_count=2, packing_bins=8, cache=False)
    assert_same_batches(list(uncached), passes[0])
    assert_same_batches(list(uncached), passes[0])  # a second pass is the same pass
    capped = validation(data_dir, max_batches=1, process_index=0, process_count=2, packing_bins=8)
    assert_same_batches(list(capped), passes[0][:1])


def test_gcs_reads_equal_local_reads(data_dir, gcs_bucket):
    root = f"{gcs_bucket}/input-pipeline-test"
    write_dataset(root, {"train": (TRAIN, 3), "validation": (VALIDATION, 2)})
    assert_same_batches(take(train(root, read_threads=4), 5), take(train(data_dir), 5))
    valid = dict(process_index=0, process_count=1)
    assert_same_batches(list(validation(root, **valid)), list(validation(data_dir, **valid)))


def test_host_batch_becomes_a_batch_sharded_global_array(data_dir):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = next(train(data_dir, process_index=None, process_count=None, mesh=mesh))
    arrays = host_shard.host_batch_to_global(batch, mesh, MeshConfig().rules)
    assert set(arrays) == set(batch)
    for k, arr in arrays.items():
        assert arr.shape == batch[k].shape and arr.dtype == np.int32
        np.testing.assert_array_equal(np.asarray(arr), batch[k])
        assert arr.sharding.spec[0] == ("data", "fsdp")
        for shard in arr.addressable_shards:  # each device holds its 2 rows, replicated over `tensor`
            np.testing.assert_array_equal(shard.data, batch[k][shard.index])
            assert shard.data.shape == (2, MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="multiple of 8"):
        host_shard.host_batch_to_global({k: v[:4] for k, v in batch.items()}, make_mesh(MeshConfig(fsdp=8)))


def test_each_host_reads_the_batch_block_its_devices_hold():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # batch blocks: data x fsdp = 4
    rules = MeshConfig().rules
    assert host_shard.host_data_shard(mesh, rules) == (0, 1)  # one process holds everything
    assert host_shard.host_data_shard(mesh, rules, devices=mesh.devices[1].flat) == (1, 2)  # hosts = data
    # hosts split along `tensor` hold replicas of every row: both read the whole batch, the same records
    assert host_shard.host_data_shard(mesh, rules, devices=mesh.devices[..., 1].flat) == (0, 1)
    no_batch_sharding = (("batch", None),) + tuple(r for r in rules if r[0] != "batch")
    assert host_shard.host_data_shard(mesh, no_batch_sharding, devices=mesh.devices[1].flat) == (0, 1)
    with pytest.raises(ValueError, match=r"batch blocks \[0, 2\] of 4"):
        host_shard.host_data_shard(mesh, rules, devices=mesh.devices[:, 0].flat)


def test_missing_shard_is_named(tmp_path):
    write_dataset(str(tmp_path), {"train": (TRAIN[:10], 3)})
    (tmp_path / records.shard_filename("train", 1, 3)).unlink()
    with pytest.raises(FileNotFoundError, match="train-00001-of-00003.tfrecord"):
        train(str(tmp_path))


def test_corrupt_record_is_named_by_file_and_record(tmp_path):
    write_dataset(str(tmp_path), {"train": (TRAIN[:10], 1)})
    shard = tmp_path / records.shard_filename("train", 0, 1)
    data = bytearray(shard.read_bytes())
    with open(shard, "rb") as f:
        third = records.index_tfrecord(f)[2]
    data[third + 20] ^= 0xFF  # a payload byte of record 2
    shard.write_bytes(bytes(data))
    with pytest.raises(records.CorruptRecordError, match=r"train-00000-of-00001.tfrecord: record 2 .*checksum"):
        take(train(str(tmp_path), seed=0, num_epochs=1), 3)


def test_missing_manifest_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):
        train(str(tmp_path))


def test_orbax_saves_and_restores_the_state_per_process(data_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = train(data_dir)
    take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 4)
    assert (tmp_path / "ckpt" / "5" / "data" / "process_0-of-1.json").exists()
    resumed = train(data_dir)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same_batches(take(resumed, 4), expected)
