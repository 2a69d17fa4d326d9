"""Hugging Face checkpoint files, local or on any fsspec filesystem (`gs://`): safetensors (read tensor by
tensor, headers without reading the data), pickled PyTorch weights only when allowed, and writing."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import posixpath
import struct
import tempfile
from typing import Any, Iterator

import fsspec
import jax
import numpy as np

from agentlm_jax.errors import MissingInputError, SetupError

log = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class PickleCheckpointError(SetupError, ValueError):
    """Only pickled PyTorch weights (`.bin`) were found and pickles were not allowed."""


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def read_json(fs, path: str) -> dict:
    with fs.open(path, "r") as f:
        return json.load(f)


def safetensors_header(fs, path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, reading only the header bytes."""
    with fs.open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


@contextlib.contextmanager
def local_file(fs, path: str) -> Iterator[str]:
    """The file itself when local; otherwise a temporary local copy, deleted afterwards."""
    if is_local(fs):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="agentlm-hf-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        log.info("downloading %s", path)
        fs.get(path, local)
        yield local


def weight_files(fs, root: str, allow_pickle: bool) -> tuple[str, dict[str, str]]:
    """('safetensors' | 'pickle', {tensor name: file path})."""
    join = functools.partial(posixpath.join, root)
    if fs.exists(join(SAFETENSORS_INDEX)):
        weight_map = read_json(fs, join(SAFETENSORS_INDEX))["weight_map"]
        return "safetensors", {k: join(v) for k, v in weight_map.items()}
    if fs.exists(join(SAFETENSORS_SINGLE)):
        return "safetensors", {k: join(SAFETENSORS_SINGLE) for k in safetensors_header(fs, join(SAFETENSORS_SINGLE))}
    pickles = [n for n in (PICKLE_INDEX, PICKLE_SINGLE) if fs.exists(join(n))]
    if pickles and not allow_pickle:
        raise PickleCheckpointError(
            f"{root} holds only pickled PyTorch weights ({pickles[0]}); unpickling can run arbitrary code. "
            f"Convert them to safetensors (e.g. `transformers` from_pretrained + save_pretrained(..., "
            f"safe_serialization=True)), or pass --allow-pickle (allow_pickle=True) if you trust the file.")
    if PICKLE_INDEX in pickles:
        weight_map = read_json(fs, join(PICKLE_INDEX))["weight_map"]
        return "pickle", {k: join(v) for k, v in weight_map.items()}
    if PICKLE_SINGLE in pickles:
        return "pickle", {k: join(PICKLE_SINGLE) for k in pickle_tensors(fs, join(PICKLE_SINGLE))}
    raise MissingInputError(f"{root}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} found; point it at a "
                            f"Hugging Face Llama checkpoint directory")


def pickle_tensors(fs, path: str) -> dict[str, Any]:
    """{name: torch tensor} of a PyTorch pickle, memory-mapped (only reached with allow_pickle)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading .bin checkpoints needs PyTorch: pip install torch") from e
    with local_file(fs, path) as local:
        return torch.load(local, map_location="cpu", mmap=True, weights_only=True)


def tensor_shapes(fs, fmt: str, files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in sorted(set(files.values())):
        if fmt == "safetensors":
            shapes.update({k: s for k, (_, s) in safetensors_header(fs, path).items()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in pickle_tensors(fs, path).items()})
    return shapes


def iter_file_tensors(fs, fmt: str, path: str, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, host array) for the named tensors of one file, one at a time."""
    if fmt == "pickle":
        import torch

        tensors = pickle_tensors(fs, path)
        for name in names:
            t = tensors[name]
            yield name, (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no torch bf16
        return
    from safetensors import safe_open

    # framework "flax" understands bfloat16 (numpy does not); pin it to the host CPU so nothing lands on
    # an accelerator before we place it.
    with local_file(fs, path) as local, jax.default_device(jax.devices("cpu")[0]):
        with safe_open(local, framework="flax") as f:
            for name in names:
                yield name, np.asarray(f.get_tensor(name))


def write_safetensors(fs, path: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    metadata = {"format": "pt"}  # transformers requires it to load the file into PyTorch
    if is_local(fs):
        save_file(tensors, path, metadata=metadata)
        readable_by_all(path)
        return
    with tempfile.TemporaryDirectory(prefix="agentlm-hf-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        save_file(tensors, local, metadata=metadata)
        fs.put(local, path)


def readable_by_all(path: str) -> None:
    """The permissions of a plain new file (0644 under the usual umask): safetensors writes its files 0600, which
    a server running as another user (vLLM in a container) cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text(fs, path: str, text: str) -> None:
    with fs.open(path, "w") as f:
        f.write(text)
