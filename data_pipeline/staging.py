"""Files the workers read during a build, under OUTPUT/.build-staging (removed after the run)."""

from __future__ import annotations

import hashlib
import posixpath
import threading
from typing import NamedTuple

import fsspec

from data_pipeline.formats.chat_template import ChatEncoder

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
                with fsspec.open(self.path, "rb") as f:
                    data = f.read()
                if hashlib.sha256(data).hexdigest() != self.sha256:
                    raise RuntimeError(f"{self.path} is not the tokenizer this run staged: is another build "
                                       "writing to the same output directory?")
                _ENCODERS.clear()  # only the current run's (a process may run many builds)
                _ENCODERS[key] = ChatEncoder.from_serialized(data.decode(), self.bos_id, self.eos_id,
                                                             max_seq_len=max_seq_len)
            return _ENCODERS[key]


_ENCODERS: dict[tuple, ChatEncoder] = {}
_ENCODERS_LOCK = threading.Lock()



def remove_staging(output: str) -> None:
    """Removes OUTPUT/.build-staging (what the workers read during a run)."""
    fs, root = fsspec.core.url_to_fs(posixpath.join(output, STAGING_DIR))
    if fs.exists(root):
        fs.rm(root, recursive=True)
