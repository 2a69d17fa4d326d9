"""Export our parameters as a Hugging Face Llama checkpoint (local or `gs://`), without PyTorch.

`model-0000N-of-0000M.safetensors` shards no larger than `max_shard_size` + `model.safetensors.index.json`,
`config.json` (a `transformers.LlamaConfig`), `generation_config.json`, and the tokenizer files with the
training chat template (tokenizer.py). Tensors are gathered to the host one at a time (the host holds at most
one shard's tensors); only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from agentlm_jax import distributed
from agentlm_jax.config import EXPORT_DTYPES, ExportConfig, ModelConfig
from agentlm_jax.hf import files
from agentlm_jax.hf.config import CONFIG_NAME, GENERATION_CONFIG_NAME, generation_config, hf_config
from agentlm_jax.hf.mapping import Entry, get_path, tensor_entries
from agentlm_jax.hf.tokenizer import save_tokenizer
from agentlm_jax.model.llama import Llama

log = logging.getLogger(__name__)

def parse_size(size: int | str) -> int:
    """Bytes in '5GB' (10^9, as Hugging Face counts), '500MB', '2GiB' or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
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


def export_hf(params: nnx.State | Llama, cfg: ModelConfig, output_dir: str, *, dtype: str = ExportConfig.dtype,
              max_shard_size: int | str = ExportConfig.max_shard_size, tokenizer_path: str | None = None,
              generation_defaults: dict | None = None, show_progress: bool = True) -> dict:
    """Write `params` as a Hugging Face Llama checkpoint to `output_dir` (local or gs://); returns the index.

    `tokenizer_path`: a tokenizer directory (anything `data_pipeline.formats.tokenizer.load_tokenizer` reads) whose
    files are saved next to the weights. `generation_defaults` go into generation_config.json (default:
    Llama-2-chat's sampling settings).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    pure = params.to_pure_dict() if isinstance(params, nnx.State) else params
    np_dtype = np.dtype(jnp.dtype(dtype))
    entries = tensor_entries(cfg, pure)
    shards = plan_shards(entries, np_dtype.itemsize, parse_size(max_shard_size))
    writer = jax.process_index() == 0
    fs, root = files.fs_and_path(output_dir)
    if writer:
        fs.makedirs(root, exist_ok=True)

    weight_map, total = {}, 0
    with tqdm(total=len(entries), desc=f"export {output_dir}", unit="tensor", disable=not show_progress) as bar:
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
            save_tokenizer(tokenizer_path, output_dir, model_max_length=cfg.max_position_embeddings)
        else:
            log.warning("no tokenizer given: %s has weights and configs but no tokenizer files", output_dir)
    return index
