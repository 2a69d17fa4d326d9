"""The trainer's input: TFRecord shards (local or `gs://`) -> host-local packed batches.

    train = train_iterator("gs://bucket/data", global_batch=64, max_seq_len=4096, seed=0, mesh=mesh)
    batch = next(train)                  # dict of int32 numpy [64 // number of hosts, 4096]
    state = train.get_state()            # JSON-able; save it with the checkpoint
    train.set_state(state)               # the following batches are exactly those after `state`
    arrays = host_batch_to_global(batch, mesh, rules)  # dict of global jax.Arrays, batch-sharded

    for batch in ValidationSet("gs://bucket/data", global_batch=64, max_seq_len=4096, mesh=mesh): ...

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
  -> next-token features per conversation (data/packing.py), read and decoded by `read_threads` threads
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
import math
import weakref
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agentlm_jax.data import packing
from agentlm_jax.data.packing import BATCH_KEYS, ExampleCounts, NextTokenFeatures
from agentlm_jax.data.tfrecord_source import TFRecordSource, load_manifest, split_files
from agentlm_jax.sharding import DEFAULT_RULES, Rules, logical_to_pspec

log = logging.getLogger(__name__)

__all__ = ["BATCH_KEYS", "InputIterator", "ValidationSet", "train_iterator", "host_batch_to_global",
           "host_data_shard"]

_STATE_VERSION = 1
_DEFAULT_PACKING_BINS = 64


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


def _read_options(paths: Sequence[str], read_threads: int | None) -> grain.ReadOptions:
    # Remote reads are latency-bound, so many threads; local reads are CPU-bound (decode holds the GIL).
    if read_threads is None:
        read_threads = 16 if any("://" in p and not p.startswith("file://") for p in paths) else 2
    return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(64, 8 * read_threads))


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
                    read_threads: int | None, max_seq_len: int, packing_bins: int, batch_rows: int,
                    shuffle_seed: int | None) -> grain.IterDataset:
    """records -> next-token features (threaded reads) -> first-fit packed rows -> batches of `batch_rows`
    (the last batch of a finite pass filled up with padding rows)."""
    examples = records.map(features).to_iter_dataset(_read_options(paths, read_threads))
    rows = packing.first_fit_pack(examples, max_seq_len, packing_bins, shuffle_seed=shuffle_seed)
    return rows.batch(batch_rows, batch_fn=functools.partial(packing.stack_packed_rows, num_rows=batch_rows))


def train_iterator(data_dir: str, *, global_batch: int, max_seq_len: int, seed: int = 0,
                   split: str = "train", num_epochs: int | None = None, overlong: str = "truncate",
                   packing_bins: int | None = None, read_threads: int | None = None, prefetch_batches: int = 2,
                   mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, process_index: int | None = None,
                   process_count: int | None = None) -> InputIterator:
    """The shuffled, packed training stream of this host (see the module docstring); endless by default.

    num_epochs: stop after this many passes over the host's share (the last batch is padded), or None.
    overlong: what to do with conversations longer than max_seq_len + 1 tokens: "truncate" or "drop".
    packing_bins: rows open at once for first-fit packing (default: max(host_batch, 64)). More bins, less
      padding (uniform 20..1500-token conversations in 2048: 84% of positions used with 8 bins, 96% with 128).
    read_threads: threads reading and decoding records (default 16 for `gs://`, 2 for local files).
    prefetch_batches: batches prepared ahead in a background thread (0: none).
    mesh, rules: the training mesh; this host then reads the share its devices hold (`host_data_shard`).
    process_index/process_count: this host's share instead (default: jax's); tests use them to simulate hosts.
    """
    index, count, host_batch = _host_layout(global_batch, mesh, rules, process_index, process_count)
    manifest = load_manifest(data_dir)
    paths = split_files(data_dir, split)
    source = TFRecordSource(paths)
    if len(source) < count:
        raise ValueError(f"{data_dir}: {len(source)} {split} records; need at least one per process ({count})")
    counts = ExampleCounts()
    features = NextTokenFeatures(max_seq_len, manifest["tasks"], overlong=overlong, counts=counts)
    bins = packing_bins or max(host_batch, _DEFAULT_PACKING_BINS)

    share = grain.MapDataset.source(source)[index::count]
    # grain shuffles epoch e with seed + e; hashing the seed first keeps run seeds 0 and 1 from sharing epochs.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0]) // 2
    batches = _packed_batches(share.shuffle(seed=shuffle_seed).repeat(num_epochs), features, paths=paths,
                              read_threads=read_threads, max_seq_len=max_seq_len, packing_bins=bins,
                              batch_rows=host_batch, shuffle_seed=seed)
    if prefetch_batches:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch_batches)

    fingerprint = {
        "split": split, "files": [p.rsplit("/", 1)[-1] for p in paths], "records": len(source),
        "seed": seed, "num_epochs": num_epochs, "max_seq_len": max_seq_len, "host_batch": host_batch,
        "packing_bins": bins, "overlong": overlong, "process_index": index, "process_count": count,
    }
    log.info("train input: %d %s records in %d files; host %d of %d reads %d; batches of %d x %d",
             len(source), split, len(paths), index, count, len(share), host_batch, max_seq_len)
    return InputIterator(iter(batches), fingerprint=fingerprint, tasks=list(manifest["tasks"]), counts=counts,
                         host_batch=host_batch, max_seq_len=max_seq_len)


class ValidationSet:
    """A finite, deterministic pass over a split, as host-local packed batches; iterate it once per evaluation.

    Every host yields the same number of batches (see the module docstring); the last global batch is
    filled up with padding rows. `max_batches` caps the pass (the first `max_batches` global batches).
    """

    def __init__(self, data_dir: str, *, global_batch: int, max_seq_len: int, split: str = "validation",
                 max_batches: int | None = None, overlong: str = "truncate", packing_bins: int | None = None,
                 read_threads: int | None = None, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 process_index: int | None = None, process_count: int | None = None, cache: bool = True):
        self._index, count, self.host_batch = _host_layout(global_batch, mesh, rules, process_index,
                                                           process_count)
        self.global_batch = global_batch
        self.max_seq_len = max_seq_len
        self.max_batches = max_batches
        self.tasks = list(load_manifest(data_dir)["tasks"])
        self._paths = split_files(data_dir, split)
        self._source = TFRecordSource(self._paths)
        self._features = NextTokenFeatures(max_seq_len, self.tasks, overlong=overlong)
        self._packing_bins = packing_bins or max(global_batch, _DEFAULT_PACKING_BINS)
        self._read_threads = read_threads
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
                                  read_threads=self._read_threads, max_seq_len=self.max_seq_len,
                                  packing_bins=self._packing_bins, batch_rows=self.global_batch,
                                  shuffle_seed=None)
        rows = slice(self._index * self.host_batch, (self._index + 1) * self.host_batch)
        it = iter(batches)
        try:
            for n, batch in enumerate(it):
                if self.max_batches is not None and n >= self.max_batches:
                    return
                yield {k: v[rows] for k, v in batch.items()}
        finally:
            it.close()


def _batch_axes(rules: Rules) -> tuple[str, ...]:
    axes = logical_to_pspec(("batch", "seq"), rules)[0]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def host_data_shard(mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    devices: Sequence[jax.Device] | None = None) -> tuple[int, int]:
    """(index, count): this process's devices hold block `index` of the global batch cut into `count` blocks.

    Pass it to `train_iterator`/`ValidationSet` (or give them `mesh=`). On the usual meshes, whose batch axes
    (`data`, `fsdp`) span the hosts, it is (process_index, process_count). When hosts hold replicas of the
    same rows (a batch axis inside each host and e.g. `tensor` across hosts), replica hosts get the same
    block, so they read the same records, as `jax.make_array_from_process_local_data` requires.
    `devices` stands for the process's devices (tests).
    """
    axes = _batch_axes(rules)
    num_blocks = math.prod(mesh.shape[a] for a in axes)
    block_of = NamedSharding(mesh, PartitionSpec(axes or None)).devices_indices_map((num_blocks,))
    if devices is None:
        devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    held = sorted({block_of[d][0].start or 0 for d in devices})
    if held != list(range(held[0], held[0] + len(held))) or held[0] % len(held):
        raise ValueError(f"this process's devices hold batch blocks {held} of {num_blocks} (mesh axes {axes}), "
                         "not one aligned run; order the mesh so each host's devices are contiguous along them")
    return held[0] // len(held), num_blocks // len(held)


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                         rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Host-local [host_batch, T] arrays -> global [global_batch, T] jax.Arrays whose batch axis is sharded
    like the logical `batch` axis (and `seq` like `seq`) under `rules`. The host batch must come from an
    iterator made with the same mesh (or the same `host_data_shard`)."""
    sharding = NamedSharding(mesh, logical_to_pspec(("batch", "seq"), rules))
    axes = _batch_axes(rules)
    batch_shards = math.prod(mesh.shape[a] for a in axes)
    _, blocks = host_data_shard(mesh, rules)
    out = {}
    for key, local in batch.items():
        global_shape = (local.shape[0] * blocks,) + local.shape[1:]
        if global_shape[0] % batch_shards:
            raise ValueError(f"global batch {global_shape[0]} cannot be split over the {batch_shards} devices of "
                             f"mesh axes {axes}; make the global batch a multiple of {batch_shards}")
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
