"""Input sources: which files/splits a source means (in the launcher) and streaming readers (in the workers).

Formats: JSONL (one object per line), JSON arrays (parsed incrementally, never loaded whole; a malformed
element is rejected alone and reading goes on; a truncated array keeps its complete records and reports
the cut tail: see `iter_json_array`), Parquet (pyarrow, batch by batch), and Hugging Face datasets
through `datasets` (one read task per split). Files are local or any fsspec URL (`gs://` through gcsfs);
`.gz`/`.zst` etc. are decompressed on the fly.

A reader yields `RawItem`s: the parsed record (or `None` with an error and the raw text; JSONL lines are
parsed later, by `RawItem.parsed()` on the workers), its location (file, 1-based record number, byte
offset where known, the file's path within its source) and the HF split it came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
from typing import Any, Iterator

import fsspec

from data_pipeline.config import SourceConfig

log = logging.getLogger(__name__)

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
MAX_RECORD_BYTES = 64 << 20  # a JSON array element larger than this is reported instead of buffered
READ_CHUNK = 1 << 20
RAW_TEXT_LIMIT = 20_000  # characters of an unparseable line/tail kept in rejected.jsonl
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

INVALID_JSON = "invalid_json"
TRUNCATED_JSON_ARRAY = "truncated_json_array"
JSON_ELEMENT_TOO_LARGE = "json_element_too_large"
TEXT_AFTER_JSON_ARRAY = "text_after_json_array"
NOT_A_JSON_ARRAY = "not_a_json_array"


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
        """This item with `line` parsed into `record`, or with an `invalid_json` error."""
        if self.line is None:
            return self
        try:
            return RawItem(json.loads(self.line), self.file, self.number, self.byte_offset, self.split,
                           rel_path=self.rel_path)
        except ValueError as e:
            return dataclasses.replace(self, line=None, error=INVALID_JSON,
                                       raw=_shorten(self.line.decode("utf-8", "replace").rstrip("\n")) + f"  [{e}]")


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
def read_task(task: ReadTask) -> Iterator[RawItem]:
    readers = {"jsonl": read_jsonl, "json": read_json_array, "parquet": read_parquet, "hf": read_hub_split}
    yield from readers[task.format](task)


def _open(path: str):
    return fsspec.open(path, "rb", compression="infer").open()


def read_jsonl(task: ReadTask) -> Iterator[RawItem]:
    offset = 0
    with _open(task.path) as f:
        for number, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if line.strip():
                yield RawItem(None, task.path, number, start, line=line, rel_path=task.rel_path)


def read_json_array(task: ReadTask) -> Iterator[RawItem]:
    with _open(task.path) as f:
        yield from iter_json_array(f, task.path, rel_path=task.rel_path)


def iter_json_array(f, path: str, chunk_size: int = READ_CHUNK, max_record_bytes: int = MAX_RECORD_BYTES,
                    rel_path: str | None = None) -> Iterator[RawItem]:
    """Elements of a top-level JSON array, decoded incrementally (`json.JSONDecoder.raw_decode` over a
    sliding buffer). Byte offsets are exact. Every element is yielded, as a record or as an error:

    - an element that is not valid JSON (or unexpected text between elements) → `invalid_json`, and
      reading goes on with the next element. An element's end is found without parsing it: the next
      `,` or `]` outside strings at nesting depth 0, so this resynchronises whenever the bad element's
      quotes pair up and its brackets close (a bad literal or escape, a raw control character, a missing
      `:` or `,`, a stray or mismatched bracket). When they don't (an unterminated string, a missing
      closing bracket), its end can't be told and the rest of the file is reported as below;
    - an element over `max_record_bytes` → `json_element_too_large` (scanned, not buffered), reading
      goes on;
    - the file ends inside an element (a cut file) → that tail is reported once as
      `truncated_json_array`, with its byte offset and the start of its text; everything before it is
      yielded normally;
    - text after the array's closing `]` → `text_after_json_array` (once, from its byte offset). It also
      catches an unpaired `"` in an element that made a `]` inside it look like the end of the array.
    Memory stays within about `max_record_bytes` plus a chunk, whatever the file size."""
    reader = _JsonArrayBuffer(f, chunk_size)
    if not reader.skip_whitespace() or reader.peek() != "[":
        yield reader.tail(NOT_A_JSON_ARRAY, path, 1, "expected '['", rel_path)
        return
    reader.advance(1)
    number, expect_value = 0, True
    while True:
        if not reader.skip_whitespace():
            log.warning("%s: JSON array ends after element %d without ']'; no element was cut", path, number)
            return
        char = reader.peek()
        if char == "]":  # (after a ',' too: a trailing comma loses nothing)
            reader.advance(1)
            if reader.skip_whitespace():  # (e.g. an unpaired '"' made a ']' inside an element look like the end)
                yield reader.tail(TEXT_AFTER_JSON_ARRAY, path, number + 1, "text after the array's closing "
                                  "']' (or an element before it has an unpaired '\"' or bracket)", rel_path)
            return
        if not expect_value and char == ",":
            reader.advance(1)
            expect_value = True
            continue
        number += 1
        value = reader.decode_value(max_record_bytes) if expect_value else None
        if value is not None:
            yield RawItem(value[0], path, number, value[1], rel_path=rel_path)
        else:
            item = reader.scan_element(path, number, max_record_bytes, rel_path,
                                       after=None if expect_value else number - 1)
            yield item
            if item.error == TRUNCATED_JSON_ARRAY:
                return
        expect_value = False


_STRUCTURE = re.compile(r'["{}\[\],]')
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.S)  # up to a closing '"' (or a lone trailing '\')


class _JsonArrayBuffer:
    """A text window over a binary file that knows the byte offset of its read position."""

    def __init__(self, f, chunk_size: int):
        import codecs

        self.f, self.chunk_size = f, chunk_size
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.byte_pos, self.eof = "", 0, 0, False
        if self.fill() and self.buf.startswith("\ufeff"):
            self.advance(1)

    def fill(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(self.chunk_size)
        self.eof = not data
        self.buf = self.buf[self.pos:] + self.utf8.decode(data, final=self.eof)
        self.pos = 0
        return bool(data)

    def advance(self, n: int) -> None:
        self.byte_pos += len(self.buf[self.pos:self.pos + n].encode("utf-8"))
        self.pos += n

    def peek(self) -> str:
        return self.buf[self.pos]

    def skip_whitespace(self) -> bool:
        """Moves to the next non-whitespace character; False at the end of the file."""
        while True:
            start = self.pos
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            self.byte_pos += self.pos - start  # whitespace is ASCII
            if self.pos < len(self.buf) or not self.fill():
                return self.pos < len(self.buf)

    def decode_value(self, max_bytes: int):
        """The fast path: (value, byte offset) of the JSON value at the read position when it is valid, whole
        in the buffer and not over `max_bytes`; None otherwise (then `scan_element` takes it)."""
        try:
            value, end = self.decoder.raw_decode(self.buf, self.pos)
        except (ValueError, RecursionError):
            return None
        if (end == len(self.buf) and not self.eof) or end - self.pos > max_bytes:  # (a number could go on)
            return None
        offset = self.byte_pos
        self.advance(end - self.pos)
        return value, offset

    def scan_element(self, path: str, number: int, max_bytes: int, rel_path: str | None,
                     after: int | None = None) -> RawItem:
        """The element at the read position as a RawItem (its record, or an error), found by scanning for
        its end (`iter_json_array`); moves past it. `after`: the number of the element that this text
        follows without a ',' (the text is then reported as it is, not parsed)."""
        offset = self.byte_pos
        length, head, complete = self._scan(max_bytes)
        where = f"element {number} at byte {offset}"
        text = self.buf[self.pos:self.pos + length]
        if not complete:
            self.advance(length)
            return RawItem(None, path, number, offset, error=TRUNCATED_JSON_ARRAY, rel_path=rel_path,
                           raw=_shorten(text if head is None else head) + f"  [the file ends inside {where}]")
        if head is not None:
            self.advance(length)
            return RawItem(None, path, number, offset, error=JSON_ELEMENT_TOO_LARGE, rel_path=rel_path,
                           raw=head[:RAW_TEXT_LIMIT] + f"...  [{where} is over {max_bytes} bytes]")
        if after is None:
            try:  # (text after the value, e.g. a missing ',', is left for the next round: as the fast path)
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                note = f"invalid JSON: {e.msg} at character {e.pos - self.pos} of the element"
            except (ValueError, RecursionError) as e:
                note = f"invalid JSON: {e}"
            else:
                if end - self.pos > max_bytes:
                    self.advance(length)
                    return RawItem(None, path, number, offset, error=JSON_ELEMENT_TOO_LARGE, rel_path=rel_path,
                                   raw=text[:RAW_TEXT_LIMIT] + f"...  [{where} is over {max_bytes} bytes]")
                self.advance(end - self.pos)
                return RawItem(value, path, number, offset, rel_path=rel_path)
        else:
            note = f"expected ',' or ']' after element {after}"
        self.advance(length)
        return RawItem(None, path, number, offset, error=INVALID_JSON, rel_path=rel_path,
                       raw=_shorten(text.rstrip()) + f"  [{where}: {note}]")

    def _scan(self, max_bytes: int) -> tuple[int, str | None, bool]:
        """Finds the next ',' or ']' outside strings at nesting depth 0 (a closing bracket also closes the
        brackets opened after its match; one without a match is ignored). Returns (its distance from the
        read position; the text's head if it was over `max_bytes`, when all but its last part was dropped
        while scanning and the read position moved on; whether the ',' or ']' was found: if not, the
        distance is to the end of the file)."""
        open_, in_string, k, head = [], False, 0, None  # open brackets; k: characters scanned past self.pos
        while True:
            buf, i = self.buf, self.pos + k
            if in_string:
                i = _STRING_BODY.match(buf, i).end()
                if i < len(buf) and buf[i] == '"':
                    in_string, k = False, i + 1 - self.pos
                    continue
            elif m := _STRUCTURE.search(buf, i):
                char, i = m[0], m.start()
                if (char == "," or char == "]") and not open_:
                    return i - self.pos, head, True
                if char == '"':
                    in_string = True
                elif char == "{" or char == "[":
                    open_.append(char)
                elif char != "," and (opener := "{" if char == "}" else "[") in open_:
                    while open_.pop() != opener:  # (it also closes the brackets opened after its match)
                        pass
                k = i + 1 - self.pos
                continue
            else:
                i = len(buf)
            k = i - self.pos  # the end of the buffer, or a backslash whose escaped character is still to come
            if k > max_bytes:  # too large to keep: go on scanning without buffering it
                if head is None:
                    head = buf[self.pos:self.pos + RAW_TEXT_LIMIT]
                self.advance(k)
                k = 0
            if not self.fill():
                return len(self.buf) - self.pos, head, False

    def tail(self, reason: str, path: str, number: int, note: str, rel_path: str | None = None) -> RawItem:
        while len(self.buf) - self.pos <= RAW_TEXT_LIMIT and self.fill():
            pass
        return RawItem(None, path, number, self.byte_pos, error=reason, rel_path=rel_path,
                       raw=_shorten(self.buf[self.pos:]) + f"  [{note} at byte {self.byte_pos}]")


def read_parquet(task: ReadTask) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    number = 0
    with fsspec.open(task.path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield RawItem(row, task.path, number, rel_path=task.rel_path)


def read_hub_split(task: ReadTask) -> Iterator[RawItem]:
    import datasets

    try:
        ds = datasets.load_dataset(task.path, split=task.split)
    except Exception as e:
        raise RuntimeError(
            f"cannot load split {task.split!r} of Hugging Face dataset {task.path!r} ({type(e).__name__}: {e}). "
            "Offline? Download the dataset's files where the hub is reachable and pass them as local files.") from e
    for number, row in enumerate(ds, start=1):
        yield RawItem(row, f"hf://{task.path}/{task.split}", number, split=task.split)


def _shorten(text: str) -> str:
    return text if len(text) <= RAW_TEXT_LIMIT else text[:RAW_TEXT_LIMIT] + f"... [{len(text)} characters]"
