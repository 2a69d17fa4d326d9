"""Where a build writes: a staging directory next to the output, swapped in only when the build succeeded.

A build writes everything (shards, rejected.jsonl, manifest, tokenizer copy) into `.NAME.staging-XXXX`
beside OUTPUT, and replaces OUTPUT with it only after the pipeline finished, so a failed or killed rebuild
leaves the previous dataset as it was. Locally the swap is two renames. On an object store (gs://) there is
no rename: the old manifest goes first (the old dataset is then incomplete, and the trainer refuses a
dataset without one), then the old files, then the new files are copied in and the manifest comes last.

The workers also read files staged during a run under STAGING/.build-staging (the tokenizer).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import threading
import uuid
from typing import NamedTuple

import fsspec

from data_pipeline.errors import OutputError
from data_pipeline.formats.chat_template import ChatEncoder
from data_pipeline.formats.records import MANIFEST_NAME

log = logging.getLogger(__name__)

STAGING_DIR = ".build-staging"  # OUTPUT/.build-staging: files for the workers during a run, removed after it


class StagedTokenizer(NamedTuple):
    """The fast tokenizer as the workers get it: its JSON in a file every worker can read (under OUTPUT), so
    the workers import neither transformers nor convert tokenizer files. Not inside the Encode DoFn: Beam
    pickles (bz2) and unpickles a DoFn a dozen times per run, which for Llama 2's 1.3 MB of JSON was ~2 s."""
    path: str
    sha256: str
    bos_id: int
    eos_id: int

    @classmethod
    def write(cls, serialized: tuple[str, int, int], output: str) -> "StagedTokenizer":
        """Stages `chat_template.serialize_tokenizer(...)` in OUTPUT/.build-staging."""
        text, bos_id, eos_id = serialized
        data = text.encode()
        path = posixpath.join(output, STAGING_DIR, "tokenizer.json")
        fs, local = fsspec.core.url_to_fs(path)
        fs.makedirs(posixpath.dirname(local), exist_ok=True)
        with fs.open(local, "wb") as f:
            f.write(data)
        return cls(path, hashlib.sha256(data).hexdigest(), bos_id, eos_id)

    def encoder(self, max_seq_len: int) -> ChatEncoder:
        """The ChatEncoder, built once per process (worker threads share it: the tokenizer encodes from
        several threads at once, and building Llama 2's takes 0.3 s of the GIL)."""
        with _ENCODERS_LOCK:
            key = (self.sha256, self.bos_id, self.eos_id, max_seq_len)
            if key not in _ENCODERS:
                data = self.read()
                _ENCODERS.clear()  # only the current run's (a process may run many builds)
                _ENCODERS[key] = ChatEncoder.from_serialized(data.decode(), self.bos_id, self.eos_id,
                                                             max_seq_len=max_seq_len)
            return _ENCODERS[key]

    def read(self) -> bytes:
        """The staged tokenizer JSON, checked against the hash this run staged."""
        with fsspec.open(self.path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise RuntimeError(f"{self.path} is not the tokenizer this run staged: is another build "
                               "writing to the same output directory?")
        return data


_ENCODERS: dict[tuple, ChatEncoder] = {}
_ENCODERS_LOCK = threading.Lock()



def remove_staging(output: str) -> None:
    """Removes OUTPUT/.build-staging (what the workers read during a run)."""
    fs, root = fsspec.core.url_to_fs(posixpath.join(output, STAGING_DIR))
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --------------------------------------------------------------------------- the output directory
def _is_url(path: str) -> bool:
    return "://" in path


def _canonical(path: str) -> str:
    """A comparable form: local paths absolute with links resolved, URLs without trailing slashes."""
    return path.rstrip("/") if _is_url(path) else os.path.realpath(os.path.expanduser(path))


def is_within(inner: str, outer: str) -> bool:
    """Whether `inner` is `outer` or under it (local paths or URLs of the same scheme)."""
    inner, outer = _canonical(inner), _canonical(outer)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def is_empty(output: str) -> bool:
    """True when `output` does not exist or is an empty directory (an object-store prefix without objects)."""
    fs, root = fsspec.core.url_to_fs(output)
    if not fs.exists(root):
        return True
    if not fs.isdir(root):
        return False
    return not fs.ls(root, detail=False)


def check_output(output: str, inputs: list[str], overwrite: bool) -> None:
    """Refuses an output that overlaps an input (a later build would read its own output; --overwrite
    would delete the input) or that is not empty without `overwrite`. `inputs`: the source paths (files,
    directories, or the directory part of a glob)."""
    for path in inputs:
        if is_within(output, path):
            raise OutputError(f"--output {output} is inside the input {path}: a build would read its own "
                              "output next time; write it somewhere else")
        if is_within(path, output):
            raise OutputError(f"the input {path} is inside --output {output}: replacing the output would "
                              "delete it; write the output somewhere else")
    if not overwrite and not is_empty(output):
        what = "a dataset (manifest.json)" if _exists(posixpath.join(output, MANIFEST_NAME)) else "files"
        raise OutputError(f"--output {output} already holds {what}: pass --overwrite to replace it once the new "
                          "build has succeeded, or choose another directory")


def _exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


def staging_dir(output: str) -> str:
    """A fresh staging directory beside `output` (same filesystem or bucket, so the swap is cheap)."""
    output = output.rstrip("/")
    parent, name = posixpath.split(output) if _is_url(output) else os.path.split(os.path.abspath(output))
    path = posixpath.join(parent, f".{name}.staging-{uuid.uuid4().hex[:8]}")
    if not _is_url(path):
        os.makedirs(path)
    return path


def leftover_staging_dirs(output: str) -> list[str]:
    """Staging directories of `output` that earlier (killed) builds left behind."""
    output = output.rstrip("/")
    fs, root = fsspec.core.url_to_fs(output)
    parent, name = posixpath.split(root)
    try:
        found = fs.glob(posixpath.join(parent, f".{name}.staging-*"))
    except FileNotFoundError:
        return []
    return sorted(found)


def discard(staging: str) -> None:
    """Removes a staging directory (a failed build's partial output)."""
    fs, root = fsspec.core.url_to_fs(staging)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def publish(staging: str, output: str) -> None:
    """Replaces `output` (if any) with the finished build in `staging` (see the module docstring)."""
    remove_staging(staging)
    if not _is_url(output):
        output = os.path.abspath(output)
        old = None
        if os.path.lexists(output):
            old = f"{staging}.old"
            os.rename(output, old)
        try:
            os.rename(staging, output)
        except OSError:
            if old:
                os.rename(old, output)
            raise
        if old:
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
        return
    fs, root = fsspec.core.url_to_fs(output)
    _, src = fsspec.core.url_to_fs(staging)
    root, src = root.rstrip("/"), src.rstrip("/")
    if fs.exists(posixpath.join(root, MANIFEST_NAME)):
        fs.rm(posixpath.join(root, MANIFEST_NAME))  # first: from here on the old dataset reads as incomplete
    if fs.exists(root):
        old = fs.find(root)
        if old:
            fs.rm(old)
    files = [f for f in fs.find(src) if posixpath.basename(f) != MANIFEST_NAME]
    for f in files + [posixpath.join(src, MANIFEST_NAME)]:  # the manifest last: it marks a complete build
        fs.copy(f, posixpath.join(root, f[len(src) + 1:]))
    fs.rm(src, recursive=True)
