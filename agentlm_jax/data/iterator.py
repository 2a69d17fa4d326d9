"""The trainer's input: TFRecord shards (local or `gs://`) -> host-local packed batches.

    data = DataConfig(path="gs://bucket/data", global_batch=64, max_seq_len=4096)
    train = train_iterator(data, seed=0, mesh=mesh)
    batch = next(train)                  # dict of int32 numpy [64 // number of hosts, 4096]
    state = train.get_state()            # JSON-able; save it with the checkpoint
    train.set_state(state)               # the following batches are exactly those after `state`
    arrays = host_batch_to_global(batch, mesh, rules)  # (host_shard.py) global jax.Arrays, batch-sharded

    for batch in ValidationSet(data, mesh=mesh, max_batches=8): ...

Batch arrays (BATCH_KEYS), int32 [host_batch, max_seq_len]:
  tokens       input token ids
  targets      the next token of the same conversation
  loss_mask    1 where `targets` is a training target (never on padding, never across conversations)
  positions    0, 1, ... restarting for every packed conversation
  segment_ids  1..k for the k conversations of a row, 0 on padding
  is_agent     1 on tokens of agent conversations
  task_ids     index into the manifest's sorted `tasks` list, -1 on padding

Training pipeline (grain), per host:
  all records of the split, in shard order
  -> this host's share: records process_index, process_index + process_count, ... (disjoint, complete)
  -> shuffled per epoch (grain's index shuffle, a different permutation per epoch), repeated forever
  -> next-token features per conversation (packing.py), read and decoded by `data.read_threads` threads
  -> first-fit packing into rows of max_seq_len -> batches of host_batch rows -> background prefetch.
Every stage is a checkpointable grain iterator, so the state is a few integers: where the packer's current
group of rows began and how many of its rows were already emitted; restoring re-packs that group.

Validation is a finite pass in file order. Every host packs the whole split identically and keeps its own
rows of each global batch, so all hosts see the same number of batches (an evaluation step is a collective;
unequal counts would hang). The split is small, so reading it on every host is cheap; the host's batches
are cached in memory after the first pass.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from agentlm_jax.config import DEFAULT_RULES, DataConfig, Rules
from agentlm_jax.data import packing
from agentlm_jax.data.dataset import TFRecordSource, split_files
from agentlm_jax.data.host_shard import host_data_shard
from agentlm_jax.data.packing import ExampleCounts, NextTokenFeatures
from data_pipeline.formats.dataset import load_manifest

log = logging.getLogger(__name__)

_STATE_VERSION = 1


def _host_layout(global_batch: int, mesh: Mesh | None, rules: Rules, process_index: int | None,
                 process_count: int | None) -> tuple[int, int, int]:
    """(data shard index, data shard count, host batch) of this process."""
    if mesh is not None:
        if process_index is not None or process_count is not None:
            raise ValueError("give either mesh or process_index/process_count, not both")
        index, count = host_data_shard(mesh, rules)
    else:
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} out of range for process_count {count}")
    if global_batch % count:
        raise ValueError(f"global_batch {global_batch} is not divisible by the {count} data shards (hosts)")
    return index, count, global_batch // count


def _read_options(paths: Sequence[str], data: DataConfig) -> grain.ReadOptions:
    threads = data.threads_for(list(paths))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(64, 8 * threads))


def _close_for_good(it: grain.DatasetIterator) -> None:
    """Closes a grain iterator chain and turns its later `close` calls into no-ops: grain's thread-prefetch
    iterator fails when `__del__` closes it again during interpreter teardown (google/grain#1196)."""
    it.close()
    chain = [it]
    while chain:
        node = chain.pop()
        node.close = lambda: None
        chain.extend(getattr(node, "_parents", ()))


class InputIterator(grain.DatasetIterator):
    """Iterator of host-local training batches (endless unless `num_epochs`) with a JSON-able, exactly
    restorable state.

    A grain `DatasetIterator`, so orbax can save it per process with grain's handler:
    `ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))` writes
    `data/process_{i}-of-{n}.json`, and `grain.checkpoint.CheckpointRestore(it)` restores it in place.
    """

    def __init__(self, grain_iter: grain.DatasetIterator, *, fingerprint: dict[str, Any], tasks: list[str],
                 counts: ExampleCounts, host_batch: int, max_seq_len: int):
        super().__init__(grain_iter)
        self._fingerprint = fingerprint
        self.tasks = tasks
        self.host_batch = host_batch
        self.max_seq_len = max_seq_len
        self._counts = counts
        # Stop grain's prefetch threads when this iterator is dropped or at exit (before modules unload).
        self._close_grain = weakref.finalize(self, _close_for_good, grain_iter)

    def close(self) -> None:
        self._close_grain()
        super().close()

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    @property
    def counts(self) -> dict[str, int]:
        """Records read so far by this process (read-ahead included): kept, truncated, dropped."""
        return self._counts.as_dict()

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "config": dict(self._fingerprint), "grain": self._parent.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"input iterator state version {state.get('version')!r} is not "
                             f"{_STATE_VERSION}; it was saved by another version of agentlm-jax")
        saved = state["config"]
        differs = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
        if differs:
            detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"cannot restore the input iterator: the data or its settings changed ({detail}). "
                             "Restore with the same dataset and data settings, or start the data afresh.")
        self._parent.set_state(state["grain"])


def _packed_batches(records: grain.MapDataset, features: NextTokenFeatures, *, paths: Sequence[str],
                    data: DataConfig, batch_rows: int, shuffle_seed: int | None) -> grain.IterDataset:
    """records -> next-token features (threaded reads) -> first-fit packed rows -> batches of `batch_rows`
    (the last batch of a finite pass filled up with padding rows)."""
    examples = records.map(features).to_iter_dataset(_read_options(paths, data))
    rows = packing.first_fit_pack(examples, data.max_seq_len, data.bins_for(batch_rows), shuffle_seed=shuffle_seed)
    return rows.batch(batch_rows, batch_fn=functools.partial(packing.stack_packed_rows, num_rows=batch_rows))


def train_iterator(data: DataConfig, *, seed: int = 0, split: str = "train", num_epochs: int | None = None,
                   mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, process_index: int | None = None,
                   process_count: int | None = None) -> InputIterator:
    """The shuffled, packed training stream of this host over the dataset at `data.path` (see the module
    docstring and config.DataConfig for the settings); endless by default.

    num_epochs: stop after this many passes over the host's share (the last batch is padded), or None.
    mesh, rules: the training mesh; this host then reads the share its devices hold (`host_data_shard`).
    process_index/process_count: this host's share instead (default: jax's); tests use them to simulate hosts.
    """
    index, count, host_batch = _host_layout(data.global_batch, mesh, rules, process_index, process_count)
    manifest = load_manifest(data.path)
    paths = split_files(data.path, split)
    source = TFRecordSource(paths)
    if len(source) < count:
        raise ValueError(f"{data.path}: {len(source)} {split} records; need at least one per process ({count})")
    counts = ExampleCounts()
    features = NextTokenFeatures(data.max_seq_len, manifest["tasks"], overlong=data.overlong, counts=counts)

    share = grain.MapDataset.source(source)[index::count]
    # grain shuffles epoch e with seed + e; hashing the seed first keeps run seeds 0 and 1 from sharing epochs.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0]) // 2
    batches = _packed_batches(share.shuffle(seed=shuffle_seed).repeat(num_epochs), features, paths=paths,
                              data=data, batch_rows=host_batch, shuffle_seed=seed)
    if data.prefetch_batches:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=data.prefetch_batches)

    fingerprint = {
        "split": split, "files": [p.rsplit("/", 1)[-1] for p in paths], "records": len(source),
        "seed": seed, "num_epochs": num_epochs, "max_seq_len": data.max_seq_len, "host_batch": host_batch,
        "packing_bins": data.bins_for(host_batch), "overlong": data.overlong, "process_index": index,
        "process_count": count,
    }
    log.info("train input: %d %s records in %d files; host %d of %d reads %d; batches of %d x %d",
             len(source), split, len(paths), index, count, len(share), host_batch, data.max_seq_len)
    return InputIterator(iter(batches), fingerprint=fingerprint, tasks=list(manifest["tasks"]), counts=counts,
                         host_batch=host_batch, max_seq_len=data.max_seq_len)


class ValidationSet:
    """A finite, deterministic pass over a split, as host-local packed batches; iterate it once per evaluation.

    Every host yields the same number of batches (see the module docstring); the last global batch is
    filled up with padding rows. `max_batches` caps the pass (the first `max_batches` global batches).
    """

    def __init__(self, data: DataConfig, *, split: str = "validation", max_batches: int | None = None,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, process_index: int | None = None,
                 process_count: int | None = None, cache: bool = True):
        self._index, count, self.host_batch = _host_layout(data.global_batch, mesh, rules, process_index,
                                                           process_count)
        self.data = data
        self.max_batches = max_batches
        self.tasks = list(load_manifest(data.path)["tasks"])
        self._paths = split_files(data.path, split)
        self._source = TFRecordSource(self._paths)
        self._features = NextTokenFeatures(data.max_seq_len, self.tasks, overlong=data.overlong)
        self._cache = cache
        self._cached: list[dict[str, np.ndarray]] | None = None

    @property
    def counts(self) -> dict[str, int]:
        """What happened to the records in the latest pass: kept, truncated, dropped."""
        return self._features.counts.as_dict()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._cached is not None:
            return iter(self._cached)
        if not self._cache:
            return self._host_batches()
        self._cached = list(self._host_batches())
        return iter(self._cached)

    def _host_batches(self) -> Iterator[dict[str, np.ndarray]]:
        self._features.counts = ExampleCounts()
        batches = _packed_batches(grain.MapDataset.source(self._source), self._features, paths=self._paths,
                                  data=self.data, batch_rows=self.data.global_batch, shuffle_seed=None)
        rows = slice(self._index * self.host_batch, (self._index + 1) * self.host_batch)
        it = iter(batches)
        try:
            for n, batch in enumerate(it):
                if self.max_batches is not None and n >= self.max_batches:
                    return
                yield {k: v[rows] for k, v in batch.items()}
        finally:
            it.close()
