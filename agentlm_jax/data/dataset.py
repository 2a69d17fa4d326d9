"""A dataset directory's shard files, and random access to its TFRecord records (local or `gs://`).

A dataset dir (local or `gs://`) holds `{split}-{i:05d}-of-{n:05d}.tfrecord` shards and `manifest.json`
(data_pipeline/formats/dataset.py). TFRecord files carry no index, so each file is scanned once when the source is built:
only the 12-byte record headers are read, sequentially, in large blocks. After that every record is one
exact byte-range read: a local file read, or a single HTTP range request on `gs://`. There is deliberately
no read-ahead for record reads: a shuffled pass visits records in random order, so read-ahead would mostly
fetch bytes nobody uses. GCS latency is hidden by reading many records at once from threads (grain's
`ReadOptions.num_threads`).
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import fsspec
import numpy as np

from data_pipeline.formats import records

log = logging.getLogger(__name__)

# Block size for the sequential header scan; large blocks make indexing one streaming read per file.
_INDEX_BLOCK_SIZE = 16 << 20


def split_files(data_dir: str, split: str) -> list[str]:
    """The split's shard paths in shard order; raises if the set `-of-N` announces is incomplete."""
    if split not in records.SPLITS:
        raise ValueError(f"split must be one of {records.SPLITS}, got {split!r}")
    fs, root = fsspec.core.url_to_fs(data_dir)
    protocol = data_dir.split("://", 1)[0] + "://" if "://" in data_dir else ""
    shards: dict[int, str] = {}
    counts = set()
    for name in fs.ls(root, detail=False):
        parsed = records.parse_shard_filename(name)
        if parsed and parsed[0] == split:
            shards[parsed[1]] = protocol + name if protocol and not name.startswith(protocol) else name
            counts.add(parsed[2])
    if not shards:
        raise FileNotFoundError(f"no {split}-*-of-*.tfrecord shards in {data_dir}")
    if len(counts) != 1:
        raise ValueError(f"{data_dir}: {split} shards disagree on the shard count: {sorted(counts)}")
    (count,) = counts
    missing = [records.shard_filename(split, i, count) for i in range(count) if i not in shards]
    if missing:
        raise FileNotFoundError(f"{data_dir}: {len(missing)} of {count} {split} shards missing, "
                                f"e.g. {missing[:3]}; was the pipeline run interrupted?")
    return [shards[i] for i in range(count)]


def _index_file(path: str) -> np.ndarray:
    """Record boundaries of one TFRecord file: int64 [num_records + 1], the last entry is the file size."""
    fs, fspath = fsspec.core.url_to_fs(path)
    with fs.open(fspath, "rb", block_size=_INDEX_BLOCK_SIZE) as f:
        offsets = records.index_tfrecord(f, path)
        size = fs.size(fspath)
        if offsets:
            records.read_record_at(f, offsets[-1], path)  # checks the last record is complete
            if f.tell() != size:
                raise records.CorruptRecordError(f"{path}: {size - f.tell()} stray bytes after the last record")
    return np.asarray(offsets + [size], dtype=np.int64)


class TFRecordSource:
    """Random access to the decoded records of TFRecord files, in file order (grain's data-source protocol:
    `len(source)` and `source[i]` -> `records.Record`)."""

    def __init__(self, paths: Sequence[str], *, verify_crc: bool = True, index_threads: int = 8):
        if not paths:
            raise ValueError("TFRecordSource needs at least one file")
        self._paths = list(paths)
        self._verify = verify_crc
        with ThreadPoolExecutor(max(1, min(index_threads, len(self._paths)))) as pool:
            self._bounds = list(pool.map(_index_file, self._paths))
        counts = [len(b) - 1 for b in self._bounds]
        self._file_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._fs = [fsspec.core.url_to_fs(p) for p in self._paths]
        log.info("indexed %d records in %d files", len(self), len(self._paths))

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    @property
    def records_per_file(self) -> list[int]:
        return np.diff(self._file_starts).tolist()

    def __len__(self) -> int:
        return int(self._file_starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, record number in that file) of a global record index."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        file_no = int(np.searchsorted(self._file_starts, index, side="right")) - 1
        return file_no, index - int(self._file_starts[file_no])

    def read_payload(self, index: int) -> bytes:
        file_no, rec_no = self.locate(index)
        path = self._paths[file_no]
        start, end = (int(v) for v in self._bounds[file_no][rec_no:rec_no + 2])
        fs, fspath = self._fs[file_no]
        framed = fs.cat_file(fspath, start=start, end=end)
        try:
            return records.read_record_at(io.BytesIO(framed), 0, path, verify=self._verify)
        except records.CorruptRecordError as e:
            raise records.CorruptRecordError(f"{path}: record {rec_no} (byte {start}): {e}") from None

    def __getitem__(self, index: int) -> records.Record:
        payload = self.read_payload(index)
        try:
            return records.decode_example(payload)
        except Exception as e:  # protobuf's DecodeError, a missing feature, unequal lengths
            file_no, rec_no = self.locate(index)
            raise ValueError(f"{self._paths[file_no]}: record {rec_no} is not a valid agentlm-jax "
                             f"tf.train.Example: {e}") from e

    def __repr__(self) -> str:
        return f"TFRecordSource({len(self._paths)} files, {len(self)} records)"
