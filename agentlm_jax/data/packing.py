"""Next-token features per conversation, and first-fit packing of conversations into fixed-length rows.

Each conversation is shifted *before* packing, so no target can come from a neighbouring conversation:
a record of n tokens becomes n - 1 positions with

    tokens[t] = input_ids[t],  targets[t] = input_ids[t + 1],  loss_mask[t] = record_loss_mask[t + 1]

(the record's mask marks target tokens, unshifted). The final token has nothing to predict, so it is not
an input at all: every packed position either predicts a token of its own conversation or is padding
(loss_mask 0, segment_ids 0, task_ids -1). A record's mask on its first token cannot be a target and is
lost by the shift; nothing else is.

Conversations longer than `max_seq_len + 1` tokens are truncated to their first `max_seq_len + 1` tokens
by default (as FastChat, the paper's trainer, truncates to the model length: the kept prefix trains exactly
as it would inside the full conversation), or dropped with `overlong="drop"`. Either way they are counted
and the first few are logged. Records of fewer than 2 tokens have no target and are dropped and counted.

Packing is grain's `FirstFitPackIterDataset` over one int32 [n, 5] feature holding the five per-token
columns, so one copy moves all of them and there is a single `segment_ids`/`positions` pair.
"""

from __future__ import annotations

import logging
import threading

import grain
import numpy as np

from agentlm_jax.config import OVERLONG_POLICIES, DataConfig
from data_pipeline.formats import records

log = logging.getLogger(__name__)

# Columns of the packed per-token feature, in order.
TOKEN_COLUMNS = ("tokens", "targets", "loss_mask", "is_agent", "task_ids")
# Every array of a batch, the train step's inputs: int32 [batch, max_seq_len] (meanings: iterator.py).
BATCH_KEYS = TOKEN_COLUMNS + ("positions", "segment_ids")
_PACKED = "columns"  # the packed feature's name inside grain
_LOGGED_OVERLONG = 5


class ExampleCounts:
    """Thread-safe tallies of what happened to the records read so far (read = kept + dropped)."""

    FIELDS = ("read", "kept", "truncated", "dropped_overlong", "dropped_too_short")

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)
        self._overlong_logged = 0

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counts[k] += v

    def claim_overlong_log(self) -> int | None:
        """The number of overlong records logged before this one, or None once enough were logged."""
        with self._lock:
            if self._overlong_logged >= _LOGGED_OVERLONG:
                return None
            self._overlong_logged += 1
            return self._overlong_logged - 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class NextTokenFeatures:
    """record -> {"columns": int32 [n - 1, 5]} (see module docstring), or None to drop it."""

    def __init__(self, max_seq_len: int, tasks: list[str], *, overlong: str = DataConfig.overlong,
                 counts: ExampleCounts | None = None):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.overlong = overlong
        self.task_index = {t: i for i, t in enumerate(tasks)}
        self.counts = counts if counts is not None else ExampleCounts()

    def __call__(self, record: records.Record) -> dict[str, np.ndarray] | None:
        n = len(record.input_ids)
        task_id = self.task_index.get(record.task)
        if task_id is None:
            raise ValueError(f"record {record.id!r} has task {record.task!r}, which the manifest's task list "
                             f"{sorted(self.task_index)} lacks; was the dataset dir assembled by hand?")
        if n < 2:
            self.counts.add(read=1, dropped_too_short=1)
            return None
        ids, mask = record.input_ids, record.loss_mask
        if n - 1 > self.max_seq_len:
            self._report_overlong(record)
            if self.overlong == "drop":
                self.counts.add(read=1, dropped_overlong=1)
                return None
            ids, mask = ids[:self.max_seq_len + 1], mask[:self.max_seq_len + 1]
            self.counts.add(truncated=1)
        self.counts.add(read=1, kept=1)
        columns = np.empty((len(ids) - 1, len(TOKEN_COLUMNS)), np.int32)
        columns[:, 0] = ids[:-1]
        columns[:, 1] = ids[1:]
        columns[:, 2] = mask[1:]
        columns[:, 3] = record.source == "agent"
        columns[:, 4] = task_id
        return {_PACKED: columns}

    def _report_overlong(self, record: records.Record) -> None:
        logged = self.counts.claim_overlong_log()
        if logged is not None:
            action = "truncating it" if self.overlong == "truncate" else "dropping it"
            log.warning("conversation %r (task %s) has %d tokens, more than max_seq_len + 1 = %d; %s%s",
                        record.id, record.task, len(record.input_ids), self.max_seq_len + 1, action,
                        " (further ones are only counted)" if logged == _LOGGED_OVERLONG - 1 else "")


def first_fit_pack(ds: grain.IterDataset, max_seq_len: int, num_bins: int,
                   shuffle_seed: int | None = None) -> grain.IterDataset:
    """Rows of `max_seq_len` positions, filled first-fit from `num_bins` open rows (grain's packer); the
    rows of each filled group are emitted in a seeded random order if `shuffle_seed` is given (first-fit
    leaves the fullest rows first), else in bin order."""
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={_PACKED: max_seq_len}, num_packing_bins=num_bins,
        shuffle_bins=shuffle_seed is not None, seed=shuffle_seed or 0)


def stack_packed_rows(rows: list[dict[str, np.ndarray]], num_rows: int | None = None) -> dict[str, np.ndarray]:
    """grain packed rows -> the batch dict (BATCH_KEYS, int32 [num_rows, max_seq_len]); rows beyond
    `len(rows)` (the end of a finite pass) are padding."""
    num_rows = len(rows) if num_rows is None else num_rows
    shape = (num_rows,) + rows[0][f"{_PACKED}_segment_ids"].shape
    columns = np.zeros(shape + (len(TOKEN_COLUMNS),), np.int32)
    columns[:len(rows)] = [r[_PACKED] for r in rows]
    segment_ids = np.zeros(shape, np.int32)
    segment_ids[:len(rows)] = [r[f"{_PACKED}_segment_ids"] for r in rows]
    positions = np.zeros(shape, np.int32)
    positions[:len(rows)] = [r[f"{_PACKED}_positions"] for r in rows]
    batch = {name: np.ascontiguousarray(columns[..., i]) for i, name in enumerate(TOKEN_COLUMNS)}
    batch["task_ids"] = np.where(segment_ids > 0, batch["task_ids"], -1).astype(np.int32)
    batch["positions"] = positions
    batch["segment_ids"] = segment_ids
    return batch
