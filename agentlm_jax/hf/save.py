"""Export our parameters as a Hugging Face Llama or Qwen2 checkpoint (local or `gs://`), without PyTorch.

`model-0000N-of-0000M.safetensors` shards no larger than `max_shard_size` (no `lm_head.weight` when the
embeddings are tied) + `model.safetensors.index.json`, `config.json` (a `transformers.LlamaConfig` or
`Qwen2Config`), `generation_config.json`, and the tokenizer files with the training chat template and a pad
token (tokenizer.py). Tensors are gathered to the host one at a time (the host
holds at most one shard's tensors); only process 0 writes.

A non-empty output directory is refused unless `overwrite`; then the files a Hugging Face export owns
(`owned_files`) are removed first, so no stale shard of an earlier export stays behind for `from_pretrained`
to load, and nothing else in the directory is touched.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import posixpath
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agentlm_jax import distributed
from agentlm_jax.config import EXPORT_DTYPES, ExportConfig, ModelConfig
from agentlm_jax.errors import ConfigError, SetupError
from agentlm_jax.hf import files
from agentlm_jax.hf.config import CONFIG_NAME, GENERATION_CONFIG_NAME, generation_config, hf_config
from agentlm_jax.hf.mapping import Entry, get_path, tensor_entries
from agentlm_jax.hf.tokenizer import OWNED_TOKENIZER_FILES, export_pad_token, save_tokenizer
from agentlm_jax.model.llama import Llama
from agentlm_jax.progress import Progress

log = logging.getLogger(__name__)

# What a Hugging Face model directory's writers (this export, `save_pretrained`) put there: removed by an
# overwriting export, so none of an earlier export's files is left to be loaded with the new ones.
OWNED_PATTERNS = ("*.safetensors", files.SAFETENSORS_INDEX, files.PICKLE_SINGLE, "pytorch_model-*.bin",
                  files.PICKLE_INDEX, CONFIG_NAME, GENERATION_CONFIG_NAME, *OWNED_TOKENIZER_FILES)


class ExistingExportError(SetupError, FileExistsError):
    """The export's output directory is not empty and overwriting was not asked for."""

def parse_size(size: int | str) -> int:
    """Bytes in '5GB' (10^9, as Hugging Face counts), '500MB', '2GiB' or an int; ConfigError otherwise."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * powers[unit])


def plan_shards(entries: list[Entry], itemsize: int, max_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of tensors, each at most `max_bytes` (a larger single tensor gets its own shard)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e.shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def _entries(fs, root: str) -> list[dict]:
    try:
        return fs.ls(root, detail=True)
    except FileNotFoundError:
        return []


def owned_files(output_dir: str) -> list[str]:
    """The names of the files directly in `output_dir` that a Hugging Face export owns (OWNED_PATTERNS)."""
    fs, root = files.fs_and_path(output_dir)
    names = [posixpath.basename(e["name"].rstrip("/")) for e in _entries(fs, root) if e["type"] == "file"]
    return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in OWNED_PATTERNS))


def check_output(output_dir: str, *, overwrite: bool = False, flag: str = "output_dir") -> None:
    """Refuse an output that is a file, or a non-empty directory unless `overwrite` (ExistingExportError), or
    (local) one that cannot be created or written (SetupError): before any work, not after it."""
    fs, root = files.fs_and_path(output_dir)
    if fs.isfile(root):
        raise ExistingExportError(f"{flag} {output_dir} is a file; give a directory")
    if files.is_local(fs):
        existing = os.path.abspath(root)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise SetupError(f"{flag} {output_dir}: cannot be created, {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise SetupError(f"{flag} {output_dir}: {existing} is not writable; choose a directory you can write")
    if overwrite:
        return
    present = sorted(posixpath.basename(e["name"].rstrip("/")) for e in _entries(fs, root))
    if present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise ExistingExportError(
            f"{flag} {output_dir} is not empty ({shown}); choose a new directory, or overwrite it (--overwrite; "
            f"overwrite=True), which removes the files of an earlier export ({', '.join(OWNED_PATTERNS[:3])}, "
            f"configs, tokenizer files) and keeps the rest")


def same_location(a: str, b: str) -> bool:
    (fs_a, path_a), (fs_b, path_b) = files.fs_and_path(a), files.fs_and_path(b)
    if files.is_local(fs_a) and files.is_local(fs_b):
        return posixpath.realpath(path_a) == posixpath.realpath(path_b)
    return fs_a.protocol == fs_b.protocol and path_a.rstrip("/") == path_b.rstrip("/")


def export_hf(params: nnx.State | Llama, cfg: ModelConfig, output_dir: str, *, dtype: str = ExportConfig.dtype,
              max_shard_size: int | str = ExportConfig.max_shard_size, tokenizer_path: str | None = None,
              generation_defaults: dict | None = None, overwrite: bool = False,
              show_progress: bool = True) -> dict:
    """Write `params` as a Hugging Face Llama checkpoint to `output_dir` (local or gs://); returns the index.

    `tokenizer_path`: a tokenizer directory (anything `data_pipeline.formats.tokenizer.load_tokenizer` reads) whose
    files are saved next to the weights. `generation_defaults` go into generation_config.json (default:
    Llama-2-chat's sampling settings). A non-empty `output_dir` is refused (ExistingExportError) unless
    `overwrite`, which removes the files of an earlier export there first (`owned_files`) and keeps the rest.
    `show_progress`: a progress bar (plain log lines off a terminal); False for none.
    """
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    if tokenizer_path and overwrite and same_location(tokenizer_path, output_dir):
        raise ConfigError(f"the tokenizer {tokenizer_path} is in the output directory, which overwriting would "
                          f"remove it from; export to another directory")
    check_output(output_dir, overwrite=overwrite)
    pad_token = export_pad_token(tokenizer_path, cfg.pad_token_id) if tokenizer_path else None
    if pad_token is not None:
        cfg = cfg.replace(pad_token_id=pad_token[1])
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    pure = params.to_pure_dict() if isinstance(params, nnx.State) else params
    np_dtype = np.dtype(jnp.dtype(dtype))
    entries = tensor_entries(cfg, pure)
    shards = plan_shards(entries, np_dtype.itemsize, max_bytes)
    writer = jax.process_index() == 0
    fs, root = files.fs_and_path(output_dir)
    if writer:
        stale = owned_files(output_dir)
        if stale:
            log.info("overwriting %s: removing %d files of an earlier export (%s)", output_dir, len(stale),
                     ", ".join(stale))
            fs.rm([posixpath.join(root, n) for n in stale])
        fs.makedirs(root, exist_ok=True)

    weight_map, total = {}, 0
    with Progress(total=len(entries), desc=f"export {output_dir}", unit="tensor", enabled=show_progress,
                  logger=log) as bar:
        for n, shard in enumerate(shards, start=1):
            filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for e in shard:
                array = get_path(pure, e.path)
                array = array[e.layer] if e.layer is not None else array
                host = distributed.to_host(array).astype(np_dtype)
                tensors[e.name] = np.ascontiguousarray(e.tmap.to_hf(host))
                weight_map[e.name] = filename
                total += tensors[e.name].nbytes
                bar.update()
            if writer:
                files.write_safetensors(fs, posixpath.join(root, filename), tensors)
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if writer:
        files.write_text(fs, posixpath.join(root, files.SAFETENSORS_INDEX), json.dumps(index, indent=2, sort_keys=True))
        config = hf_config(cfg, dtype)
        files.write_text(fs, posixpath.join(root, CONFIG_NAME), config.to_json_string())
        files.write_text(fs, posixpath.join(root, GENERATION_CONFIG_NAME),
                    generation_config(config, generation_defaults).to_json_string())
        if tokenizer_path:
            save_tokenizer(tokenizer_path, output_dir, model_max_length=cfg.max_position_embeddings,
                           pad_token=pad_token[0])
        else:
            log.warning("no tokenizer given: %s has weights and configs but no tokenizer files", output_dir)
    return index
