"""Input sources: which files/splits a source means (in the launcher) and streaming readers (in the workers).

Formats: JSONL (one object per line), JSON arrays (parsed incrementally, never loaded whole; a malformed
element is rejected alone and reading goes on; a truncated array keeps its complete records and reports
the cut tail: json_stream.py), Parquet (pyarrow, batch by batch), and Hugging Face datasets
through `datasets` (one read task per split). Files are local or any fsspec URL (`gs://` through gcsfs);
`.gz`/`.zst` etc. are decompressed on the fly.

A reader yields `RawItem`s: the parsed record (or `None` with an error and the raw text; JSONL lines are
parsed later, by `RawItem.parsed()` on the workers), its location (file, 1-based record number, byte
offset where known, the file's path within its source) and the HF split it came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import posixpath
import re
from typing import Any, Iterator

import fsspec

from data_pipeline.config import SourceConfig
from data_pipeline.json_stream import (INVALID_JSON, INVALID_UTF8, NESTED_TOO_DEEPLY, iter_json_array, shorten,
                                      value_problem)

log = logging.getLogger(__name__)

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
UNREADABLE_FILE = "unreadable_file"  # a file that cannot be read (on) at all: corrupt Parquet, a cut .gz, ...



@dataclasses.dataclass(frozen=True)
class ReadTask:
    """One unit of reading, done by one worker: a file, or one split of a Hugging Face dataset."""
    source: str  # the source's name
    kind: str  # "agent" | "general"
    path: str  # file path/URL, or the hub id
    format: str  # jsonl | json | parquet | hf
    split: str | None = None
    rel_path: str | None = None  # the file's path within its source (see `list_source_files`)


@dataclasses.dataclass(frozen=True)
class RawItem:
    record: Any  # the parsed JSON value / row; None when `error` is set
    file: str
    number: int  # 1-based line (JSONL), element (JSON array) or row (Parquet, HF) number
    byte_offset: int | None = None
    split: str | None = None
    error: str | None = None  # a rejection reason when the input could not be parsed
    raw: str | None = None  # the unparseable text (shortened to RAW_TEXT_LIMIT)
    line: bytes | None = None  # a JSONL line not parsed yet (parsing happens on the workers: `parsed()`)
    rel_path: str | None = None  # the file's path within its source (ReadTask.rel_path); None: its name

    def parsed(self) -> "RawItem":
        """This item with `line` parsed into `record`, or with an error: `invalid_utf8`, `invalid_json`,
        `nested_too_deeply` or `lone_surrogate` (the JSON arrays' policy: json_stream.py)."""
        if self.line is None:
            return self
        try:
            record = json.loads(self.line.decode("utf-8"))
        except UnicodeDecodeError as e:
            return self._error(INVALID_UTF8, f"byte {self.byte_offset + e.start} is not UTF-8")
        except RecursionError:
            return self._error(NESTED_TOO_DEEPLY, "nested too deeply to parse")
        except ValueError as e:
            return self._error(INVALID_JSON, str(e))
        if problem := value_problem(record):
            return self._error(*problem)
        return RawItem(record, self.file, self.number, self.byte_offset, self.split, rel_path=self.rel_path)

    def _error(self, reason: str, note: str) -> "RawItem":
        text = self.line.decode("utf-8", "backslashreplace").rstrip("\n")
        return dataclasses.replace(self, line=None, error=reason, raw=shorten(text) + f"  [line {self.number}: {note}]")


# --------------------------------------------------------------------------- expansion (launcher)
def expand_source(source: SourceConfig, kind: str) -> list[ReadTask]:
    """The read tasks of one configured source; raises a clear error when it names nothing readable."""
    if unset := re.findall(r"\$\{(\w+)\}", source.path):
        raise ValueError(f"source {source.name}: environment variable {unset[0]} is not set (path {source.path})")
    if source.format == "hf" or (source.format == "auto" and _looks_like_hub_id(source.path)):
        return [ReadTask(source.name, kind, source.path, "hf", split) for split in hub_splits(source)]
    files = list_source_files(source.path)
    tasks = []
    for path, rel_path in files:
        fmt = source.format if source.format != "auto" else file_format(path)
        if fmt is None:
            if len(files) == 1:
                raise ValueError(f"{path}: unknown file type; use .jsonl, .json or .parquet (or set format)")
            continue
        tasks.append(ReadTask(source.name, kind, path, fmt, rel_path=rel_path))
    if not tasks:
        raise FileNotFoundError(f"source {source.name}: no .jsonl/.json/.parquet files in {source.path}")
    return tasks


def file_format(path: str) -> str | None:
    name = path.lower()
    for ext in COMPRESSIONS:
        name = name[: -len(ext)] if name.endswith(ext) else name
    return FILE_FORMATS.get(posixpath.splitext(name)[1])


def list_files(path: str) -> list[str]:
    """A file, every data file under a directory, or a glob; sorted, with the URL scheme kept."""
    return [url for url, _ in list_source_files(path)]


def list_source_files(path: str) -> list[tuple[str, str]]:
    """(URL, path within the source) of each file `list_files` gives. The path within the source is
    relative to the directory (for a glob: to its last directory before the first wildcard; for a file:
    to its directory, i.e. the file name), so it is the same wherever the data lives (any checkout,
    local or gs://) and unique within the source: record ids made from it (normalize) stay stable."""
    fs, root = fsspec.core.url_to_fs(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    unstrip = (lambda p: p) if protocol in ("file", "local") else (lambda p: f"{protocol}://{p}")
    root = root.rstrip("/") or root
    if any(c in root for c in "*?["):
        found = sorted(fs.glob(root))
        base = root[: min(root.find(c) for c in "*?[" if c in root)].rpartition("/")[0]
    elif fs.isdir(root):
        found = sorted(p for p in fs.find(root) if file_format(p))
        base = root
    elif fs.exists(root):
        found, base = [root], posixpath.dirname(root)
    else:
        raise FileNotFoundError(f"no such file or directory: {path}")
    if not found:
        raise FileNotFoundError(f"{path} matches no files")
    return [(unstrip(p), _relative_to(p, base)) for p in found]


def _relative_to(path: str, base: str) -> str:
    path = path.rstrip("/")
    prefix = base.rstrip("/") + "/"
    return path[len(prefix):] if base and path.startswith(prefix) else posixpath.basename(path)


def _looks_like_hub_id(path: str) -> bool:
    if "://" in path or file_format(path) or not _HUB_ID.match(path):
        return False
    return not fsspec.core.url_to_fs(path)[0].exists(path)


def hub_splits(source: SourceConfig) -> list[str]:
    """The chosen splits, or all of the dataset's splits (asks the hub: a clear error when it cannot)."""
    if source.splits:
        return list(source.splits)
    import datasets

    try:
        return list(datasets.get_dataset_split_names(source.path))
    except Exception as e:
        raise RuntimeError(
            f"source {source.name}: cannot list the splits of Hugging Face dataset {source.path!r} "
            f"({type(e).__name__}: {e}). Offline? Download its files where the hub is reachable "
            f"(`hf download {source.path} --repo-type dataset --local-dir DIR`) and pass the local files "
            "(e.g. DIR/data/*.parquet) instead.") from e


# --------------------------------------------------------------------------- readers (workers)
@dataclasses.dataclass
class ReadPosition:
    """How far a reader is through its task, for progress lines: `done` of `total` `unit` (bytes of the
    file as stored, compressed or not; rows of a Parquet file or HF split); total None when unknown."""
    done: int = 0
    total: int | None = None
    unit: str = "bytes"


def read_task(task: ReadTask, position: ReadPosition | None = None) -> Iterator[RawItem]:
    """The task's items (`position`, when given, follows the reading). A file that fails to read (corrupt Parquet, a cut or corrupt compressed file, an
    I/O error) keeps the items read before the failure, and the failure becomes one `unreadable_file`
    rejection after them, naming the record number and byte offset it was reached at. (A Hugging Face
    split that cannot be loaded stops the build: that is the hub or the network, not the data.)"""
    readers = {"jsonl": read_jsonl, "json": read_json_array, "parquet": read_parquet, "hf": read_hub_split}
    position = position or ReadPosition()
    if task.format == "hf":
        yield from read_hub_split(task, position)
        return
    last = None
    try:
        for last in readers[task.format](task, position):
            yield last
    except Exception as e:  # whatever the decompressor, pyarrow or the filesystem raises
        number = last.number + 1 if last else 1
        offset = 0 if last is None else (last.byte_offset + len(last.line) if last.line is not None else None)
        where = f"record {number}" + (f" (byte {offset})" if offset is not None else "")
        note = f"cannot read {task.path} from {where} on: {type(e).__name__}: {e}"
        log.warning("%s; the records before it are kept, the rest of the file is one unreadable_file rejection", note)
        yield RawItem(None, task.path, number, offset, error=UNREADABLE_FILE, raw=shorten(f"[{note}]"),
                      rel_path=task.rel_path)


@contextlib.contextmanager
def _open(path: str, position: ReadPosition):
    """The file, decompressed on the fly by its extension; `position` follows the stored (compressed) bytes."""
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    fs, root = fsspec.core.url_to_fs(path)
    position.total, position.unit = fs.size(root), "bytes"
    with fs.open(root, "rb") as raw:
        compression = infer_compression(path)
        with (compr[compression](raw, mode="r") if compression else contextlib.nullcontext(raw)) as f:
            yield f, raw


def read_jsonl(task: ReadTask, position: ReadPosition) -> Iterator[RawItem]:
    offset = 0
    with _open(task.path, position) as (f, raw):
        for number, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            position.done = raw.tell()
            if line.strip():
                yield RawItem(None, task.path, number, start, line=line, rel_path=task.rel_path)


def read_json_array(task: ReadTask, position: ReadPosition) -> Iterator[RawItem]:
    with _open(task.path, position) as (f, raw):
        for e in iter_json_array(f, task.path):
            position.done = raw.tell()
            yield RawItem(e.record, task.path, e.number, e.byte_offset, error=e.error, raw=e.raw, rel_path=task.rel_path)


def read_parquet(task: ReadTask, position: ReadPosition) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    number = 0
    with fsspec.open(task.path, "rb") as f:
        parquet = pq.ParquetFile(f)
        position.total, position.unit = parquet.metadata.num_rows, "rows"
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                position.done = number
                yield RawItem(row, task.path, number, rel_path=task.rel_path)


def read_hub_split(task: ReadTask, position: ReadPosition) -> Iterator[RawItem]:
    import datasets

    try:
        ds = datasets.load_dataset(task.path, split=task.split)
    except Exception as e:
        raise RuntimeError(
            f"cannot load split {task.split!r} of Hugging Face dataset {task.path!r} ({type(e).__name__}: {e}). "
            "Offline? Download the dataset's files where the hub is reachable and pass them as local files.") from e
    position.total, position.unit = len(ds), "rows"
    for number, row in enumerate(ds, start=1):
        position.done = number
        yield RawItem(row, f"hf://{task.path}/{task.split}", number, split=task.split)
