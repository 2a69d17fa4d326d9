"""Hugging Face Llama checkpoints ↔ our parameters, without PyTorch.

Import (`import_hf`): `config.json` + `model.safetensors` or sharded `model-*.safetensors` with
`model.safetensors.index.json`, local or `gs://`. Every tensor's name and shape is checked against the
architecture before anything is loaded (missing / unexpected / mis-shaped tensors are named in one error).
Tensors are then read one at a time and placed directly onto their target sharding with
`jax.make_array_from_callback` (each device receives only its slice). The stacked per-layer parameters
([L, ...], from `nnx.scan`) are assembled on the devices: a zero-filled sharded [L, ...] buffer is updated
in place (donated) one layer at a time, so the host never holds more than one tensor in a few forms and
never a stacked [L, ...] copy. Peak host memory beyond the parameters' own device buffers ≈ 3 × the largest
single tensor in the parameter dtype (its file-dtype copy, the cast, the transposed copy; for Llama 2 in
float32 that tensor is the 32000×D embedding / output head: ≈ 1.6 GB at 7B, ≈ 3.1 GB at 70B), independent
of the number of layers, plus the memory-mapped file's pages (page cache, reclaimable). Measured on CPU:
2 → 8 layers of D=1024 changed the overhead only by the file size.

Export (`export_hf`): `model-0000N-of-0000M.safetensors` shards no larger than `max_shard_size` +
`model.safetensors.index.json`, `config.json` (a `transformers.LlamaConfig`), `generation_config.json`, and
tokenizer files, to a local directory or `gs://`. Tensors are gathered to the host one at a time (the host holds
at most one shard's tensors); only process 0 writes.

Weight layouts: Hugging Face `nn.Linear` weights are [out, in]; our kernels are [in..., out...] einsum
operands (e.g. q_proj [D,N,H] ↔ HF [N·H, D]), so conversion is a transpose and a reshape. Rotary embeddings
use the Hugging Face ("rotate_half") layout, so q/k need no permutation in either direction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import posixpath
import re
import struct
import tempfile
from typing import Any, Iterator

import fsspec
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from agentlm_jax import distributed
from agentlm_jax.model.config import RUNTIME_FIELDS, ModelConfig
from agentlm_jax.model.llama import Llama, abstract_model
from agentlm_jax.sharding import DEFAULT_RULES, MeshConfig, Rules, make_mesh, state_shardings

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Buffers some older checkpoints saved; they are recomputed from the config, so they are skipped on import.
DERIVED_BUFFERS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
_SAFETENSORS_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
# Llama-2-chat's own generation defaults (sampling, temperature 0.6, top-p 0.9); evaluators set their own.
CHAT_GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the architecture in its config."""


class ArchitectureMismatchError(ValueError):
    """The checkpoint's config.json describes another architecture than the configured model (import_hf's base)."""


class PickleCheckpointError(ValueError):
    """Only pickled PyTorch weights (`.bin`) were found and pickles were not allowed."""


# ----------------------------------------------------------------------------------- the tensor name table
@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf: str  # Hugging Face name; "{i}" stands for the layer index
    ours: tuple[str, ...]  # path in our parameters (inside one decoder block for per-layer tensors)
    in_dims: int  # how many leading dims of our array are the HF Linear's input dims; 0 = same layout

    def shape_in_hf(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self.in_dims:
            return tuple(our_shape)
        return math.prod(our_shape[self.in_dims:]), math.prod(our_shape[:self.in_dims])

    def to_ours(self, x: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
        return (x.T if self.in_dims else x).reshape(our_shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if not self.in_dims:
            return x
        return x.reshape(math.prod(x.shape[:self.in_dims]), -1).T


GLOBAL_TENSORS = (
    TensorMap("model.embed_tokens.weight", ("embedder", "embedding"), 0),
    TensorMap("model.norm.weight", ("final_norm", "scale"), 0),
    TensorMap("lm_head.weight", ("lm_head", "kernel"), 1),
)
LAYER_TENSORS = (
    TensorMap("model.layers.{i}.self_attn.q_proj.weight", ("attn", "q_proj"), 1),
    TensorMap("model.layers.{i}.self_attn.k_proj.weight", ("attn", "k_proj"), 1),
    TensorMap("model.layers.{i}.self_attn.v_proj.weight", ("attn", "v_proj"), 1),
    TensorMap("model.layers.{i}.self_attn.o_proj.weight", ("attn", "o_proj"), 2),
    TensorMap("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "gate_proj"), 1),
    TensorMap("model.layers.{i}.mlp.up_proj.weight", ("mlp", "up_proj"), 1),
    TensorMap("model.layers.{i}.mlp.down_proj.weight", ("mlp", "down_proj"), 1),
    TensorMap("model.layers.{i}.input_layernorm.weight", ("attn_norm", "scale"), 0),
    TensorMap("model.layers.{i}.post_attention_layernorm.weight", ("mlp_norm", "scale"), 0),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor and where it lives in our parameters."""

    name: str  # Hugging Face name
    path: tuple  # path of our parameter array in the pure-dict params
    layer: int | None  # index along the stacked `layers` axis, or None if the array is this tensor alone
    shape: tuple[int, ...]  # our shape of this tensor (one layer's slice for stacked arrays)
    tmap: TensorMap

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.tmap.shape_in_hf(self.shape)


def _get(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def tensor_entries(cfg: ModelConfig, params: dict) -> list[Entry]:
    """All Hugging Face tensors of the architecture, in Hugging Face order, mapped onto `params` (pure dict)."""
    entries = []

    def add(tmap: TensorMap, hf_name: str, path: tuple, layer: int | None):
        shape = tuple(_get(params, path).shape)
        entries.append(Entry(hf_name, path, layer, shape[1:] if layer is not None else shape, tmap))

    add(GLOBAL_TENSORS[0], GLOBAL_TENSORS[0].hf, GLOBAL_TENSORS[0].ours, None)
    for i in range(cfg.num_layers):
        for t in LAYER_TENSORS:
            if cfg.scan_layers:
                add(t, t.hf.format(i=i), ("layers",) + t.ours, i)
            else:
                add(t, t.hf.format(i=i), ("layers", i) + t.ours, None)
    for t in GLOBAL_TENSORS[1:]:
        add(t, t.hf, t.ours, None)
    return entries


# ------------------------------------------------------------------------------------------ file access
def _fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _read_json(fs, path: str) -> dict:
    with fs.open(path, "r") as f:
        return json.load(f)


def safetensors_header(fs, path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, reading only the header bytes."""
    with fs.open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


@contextlib.contextmanager
def _local_file(fs, path: str) -> Iterator[str]:
    """The file itself when local; otherwise a temporary local copy, deleted afterwards."""
    if _is_local(fs):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="agentlm-hf-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        log.info("downloading %s", path)
        fs.get(path, local)
        yield local


def _weight_files(fs, root: str, allow_pickle: bool) -> tuple[str, dict[str, str]]:
    """('safetensors' | 'pickle', {tensor name: file path})."""
    join = functools.partial(posixpath.join, root)
    if fs.exists(join(SAFETENSORS_INDEX)):
        weight_map = _read_json(fs, join(SAFETENSORS_INDEX))["weight_map"]
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
        weight_map = _read_json(fs, join(PICKLE_INDEX))["weight_map"]
        return "pickle", {k: join(v) for k, v in weight_map.items()}
    if PICKLE_SINGLE in pickles:
        return "pickle", {k: join(PICKLE_SINGLE) for k in _pickle_tensors(fs, join(PICKLE_SINGLE))}
    raise FileNotFoundError(f"{root}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} found; point --model at a "
                            f"Hugging Face Llama checkpoint directory")


def _pickle_tensors(fs, path: str) -> dict[str, Any]:
    """{name: torch tensor} of a PyTorch pickle, memory-mapped (only reached with allow_pickle)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading .bin checkpoints needs PyTorch: pip install torch") from e
    with _local_file(fs, path) as local:
        return torch.load(local, map_location="cpu", mmap=True, weights_only=True)


def _tensor_shapes(fs, fmt: str, files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in sorted(set(files.values())):
        if fmt == "safetensors":
            shapes.update({k: s for k, (_, s) in safetensors_header(fs, path).items()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in _pickle_tensors(fs, path).items()})
    return shapes


def _iter_file_tensors(fs, fmt: str, path: str, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, host array) for the named tensors of one file, one at a time."""
    if fmt == "pickle":
        import torch

        tensors = _pickle_tensors(fs, path)
        for name in names:
            t = tensors[name]
            yield name, (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no torch bf16
        return
    from safetensors import safe_open

    # framework "flax" understands bfloat16 (numpy does not); pin it to the host CPU so nothing lands on
    # an accelerator before we place it.
    with _local_file(fs, path) as local, jax.default_device(jax.devices("cpu")[0]):
        with safe_open(local, framework="flax") as f:
            for name in names:
                yield name, np.asarray(f.get_tensor(name))


# ------------------------------------------------------------------------------------------------ import
def load_hf_config(model_dir: str, **runtime: Any) -> ModelConfig:
    """ModelConfig from `{model_dir}/config.json`; `runtime` sets RUNTIME_FIELDS (dtype, param_dtype, ...)."""
    fs, root = _fs_and_path(model_dir)
    path = posixpath.join(root, CONFIG_NAME)
    if not fs.exists(path):
        raise FileNotFoundError(f"{model_dir}: no {CONFIG_NAME}; not a Hugging Face model directory")
    try:
        return ModelConfig.from_hf(_read_json(fs, path), **runtime)
    except ValueError as e:
        raise ValueError(f"{model_dir}/{CONFIG_NAME}: {e}") from e


def _check_architecture(cfg: ModelConfig, base: ModelConfig, model_dir: str) -> None:
    diffs = [f"{f.name}: config.json has {getattr(cfg, f.name)!r}, the given config {getattr(base, f.name)!r}"
             for f in dataclasses.fields(cfg)
             if f.name not in RUNTIME_FIELDS + ("initializer_range",) and getattr(cfg, f.name) != getattr(base, f.name)]
    if diffs:
        raise ArchitectureMismatchError(
            f"{model_dir}: the checkpoint's architecture differs from the configured model:\n  " + "\n  ".join(diffs)
            + f"\nSet the model section of your config to the checkpoint's {CONFIG_NAME} values (configs/"
            "llama2-7b.yaml, llama2-13b.yaml and llama2-70b.yaml carry the official Llama 2 ones), or point "
            "init_from at a checkpoint of the configured model.")


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not DERIVED_BUFFERS.match(n))
    misshaped = sorted(f"{n}: expected {expected[n]}, found {found[n]}"
                       for n in set(expected) & set(found) if tuple(found[n]) != tuple(expected[n]))
    problems = [f"{title} ({len(items)}):\n    " + "\n    ".join(items)
                for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise CheckpointMismatchError(f"{where}: the tensors do not match the Llama architecture of its "
                                      f"config.json:\n  " + "\n  ".join(problems))


def default_mesh() -> Mesh:
    """A one-device mesh (the first device): the target when no mesh is given."""
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def import_hf(model_dir: str, *, base: ModelConfig | None = None, runtime: dict[str, Any] | None = None,
              mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, allow_pickle: bool = False,
              show_progress: bool = True) -> tuple[ModelConfig, nnx.State]:
    """Load a Hugging Face Llama checkpoint directory (local or gs://) as (ModelConfig, params nnx.State).

    The architecture comes from config.json. The runtime fields (RUNTIME_FIELDS: dtype, param_dtype, remat,
    scan_layers, attention_impl, attention_block_size) come from `base` if given, whose architecture must then
    match the checkpoint's (a training config naming the model it fine-tunes; else ArchitectureMismatchError),
    updated by `runtime` (e.g. {"dtype": "bfloat16"}).
    Parameters are created in `param_dtype`, each directly on the sharding its logical axes map to on `mesh`
    by `rules` (default: one device). Use with `nnx.merge(graphdef, params)` or `nnx.update(model, params)`,
    or call `load_hf_model`.
    """
    settings = {f: getattr(base or ModelConfig(), f) for f in RUNTIME_FIELDS} | dict(runtime or {})
    cfg = load_hf_config(model_dir, **settings)
    if base is not None:
        _check_architecture(cfg, base, model_dir)
    mesh = mesh or default_mesh()
    abstract = nnx.state(abstract_model(cfg), nnx.Param)
    shardings = state_shardings(abstract, mesh, rules).to_pure_dict()
    entries = tensor_entries(cfg, abstract.to_pure_dict())

    fs, root = _fs_and_path(model_dir)
    fmt, files = _weight_files(fs, root, allow_pickle)
    check_tensors({e.name: e.hf_shape for e in entries}, _tensor_shapes(fs, fmt, files), model_dir)

    placer = _Placer(abstract.to_pure_dict(), shardings, jnp.dtype(cfg.param_dtype))
    by_name = {e.name: e for e in entries}
    by_file: dict[str, list[str]] = {}
    for e in entries:
        by_file.setdefault(files[e.name], []).append(e.name)
    with tqdm(total=len(entries), desc=f"import {model_dir}", unit="tensor", disable=not show_progress) as bar:
        for path, names in by_file.items():
            for name, array in _iter_file_tensors(fs, fmt, path, names):
                placer.put(by_name[name], array)
                bar.update()
    params = placer.result()
    nnx.replace_by_pure_dict(abstract, params)
    return cfg, abstract


def load_hf_model(model_dir: str, **kwargs: Any) -> tuple[ModelConfig, Llama]:
    """`import_hf` and build the model from the loaded parameters."""
    cfg, params = import_hf(model_dir, **kwargs)
    graphdef, _ = nnx.split(abstract_model(cfg))
    return cfg, nnx.merge(graphdef, params)


class _Placer:
    """Puts host tensors onto their shardings; assembles stacked [L, ...] arrays one layer at a time."""

    def __init__(self, abstract: dict, shardings: dict, dtype):
        self.abstract, self.shardings, self.dtype = abstract, shardings, dtype
        self.out: dict = jax.tree.map(lambda _: None, abstract)
        self._set_layer: dict[tuple, Any] = {}

    def put(self, entry: Entry, hf_array: np.ndarray) -> None:
        sharding: NamedSharding = _get(self.shardings, entry.path)
        host = np.ascontiguousarray(entry.tmap.to_ours(hf_array.astype(self.dtype), entry.shape))
        if entry.layer is None:
            _set(self.out, entry.path, jax.make_array_from_callback(host.shape, sharding, lambda i: host[i]))
            return
        layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        layer = jax.make_array_from_callback(host.shape, layer_sharding, lambda i: host[i])
        stacked = _get(self.out, entry.path)
        if stacked is None:
            shape = _get(self.abstract, entry.path).shape
            stacked = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)()
        if entry.path not in self._set_layer:
            self._set_layer[entry.path] = jax.jit(
                lambda s, x, i: jax.lax.dynamic_update_index_in_dim(s, x, i, axis=0),
                donate_argnums=0, out_shardings=sharding)
        _set(self.out, entry.path, self._set_layer[entry.path](stacked, layer, entry.layer))

    def result(self) -> dict:
        return self.out


# ------------------------------------------------------------------------------------------------ export
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


def hf_config(cfg: ModelConfig, dtype: str):
    import transformers

    return transformers.LlamaConfig(**cfg.to_hf(), architectures=["LlamaForCausalLM"], dtype=dtype)


def export_hf(params: nnx.State | Llama, cfg: ModelConfig, output_dir: str, *, dtype: str = "bfloat16",
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, tokenizer_path: str | None = None,
              generation_defaults: dict | None = None, show_progress: bool = True) -> dict:
    """Write `params` as a Hugging Face Llama checkpoint to `output_dir` (local or gs://); returns the index.

    `tokenizer_path`: a tokenizer directory (anything `data_pipeline.tokenizer.load_tokenizer` reads) whose
    files are saved next to the weights. `generation_defaults` go into generation_config.json (default:
    Llama-2-chat's sampling settings).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    pure = params.to_pure_dict() if isinstance(params, nnx.State) else params
    np_dtype = np.dtype(EXPORT_DTYPES[dtype])
    entries = tensor_entries(cfg, pure)
    shards = plan_shards(entries, np_dtype.itemsize, parse_size(max_shard_size))
    writer = jax.process_index() == 0
    fs, root = _fs_and_path(output_dir)
    if writer:
        fs.makedirs(root, exist_ok=True)

    weight_map, total = {}, 0
    with tqdm(total=len(entries), desc=f"export {output_dir}", unit="tensor", disable=not show_progress) as bar:
        for n, shard in enumerate(shards, start=1):
            filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for e in shard:
                array = _get(pure, e.path)
                array = array[e.layer] if e.layer is not None else array
                host = distributed.to_host(array).astype(np_dtype)
                tensors[e.name] = np.ascontiguousarray(e.tmap.to_hf(host))
                weight_map[e.name] = filename
                total += tensors[e.name].nbytes
                bar.update()
            if writer:
                _write_safetensors(fs, posixpath.join(root, filename), tensors)
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if writer:
        _write_text(fs, posixpath.join(root, SAFETENSORS_INDEX), json.dumps(index, indent=2, sort_keys=True))
        config = hf_config(cfg, dtype)
        _write_text(fs, posixpath.join(root, CONFIG_NAME), config.to_json_string())
        _write_text(fs, posixpath.join(root, GENERATION_CONFIG_NAME),
                    _generation_config(config, generation_defaults).to_json_string())
        if tokenizer_path:
            save_tokenizer(tokenizer_path, output_dir, model_max_length=cfg.max_position_embeddings)
        else:
            log.warning("no tokenizer given: %s has weights and configs but no tokenizer files", output_dir)
    return index


def _generation_config(config, defaults: dict | None):
    import transformers

    gen = transformers.GenerationConfig.from_model_config(config)
    for key, value in (CHAT_GENERATION_DEFAULTS if defaults is None else defaults).items():
        setattr(gen, key, value)
    return gen


def _write_safetensors(fs, path: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    metadata = {"format": "pt"}  # transformers requires it to load the file into PyTorch
    if _is_local(fs):
        save_file(tensors, path, metadata=metadata)
        _readable_by_all(path)
        return
    with tempfile.TemporaryDirectory(prefix="agentlm-hf-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        save_file(tensors, local, metadata=metadata)
        fs.put(local, path)


def _readable_by_all(path: str) -> None:
    """The permissions of a plain new file (0644 under the usual umask): safetensors writes its files 0600, which
    a server running as another user (vLLM in a container) cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_text(fs, path: str, text: str) -> None:
    with fs.open(path, "w") as f:
        f.write(text)


def llama2_chat_jinja() -> str:
    """The training chat template (`data_pipeline.chat_template`) as a Hugging Face Jinja `chat_template`, so
    `tokenizer.apply_chat_template` (vLLM, lm-eval, AgentBench clients) renders prompts exactly as AgentLM
    was trained: the AgentTuning system prompt unless the messages bring their own, each user/assistant pair
    its own `<s>[INST] ... [/INST] {answer} </s>` block."""
    from data_pipeline.chat_template import B_INST, B_SYS, DEFAULT_SYSTEM_PROMPT, E_INST, E_SYS

    def q(text: str) -> str:  # a Jinja string literal
        return json.dumps(text)

    return (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] | trim %}{% set loop_messages = messages[1:] %}"
        f"{{% else %}}{{% set system_message = {q(DEFAULT_SYSTEM_PROMPT)} %}}{{% set loop_messages = messages %}}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.index0 == 0 and system_message %}"
        f"{{% set content = {q(B_SYS)} + system_message + {q(E_SYS)} + (message['content'] | trim) %}}"
        "{% else %}{% set content = message['content'] | trim %}{% endif %}"
        f"{{{{ bos_token + {q(B_INST + ' ')} + content + {q(' ' + E_INST)} }}}}"
        "{% else %}{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    )


def hf_tokenizer_files(tokenizer, model_max_length: int | None = None) -> dict[str, str]:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` for a pipeline tokenizer.

    `tokenizer.json` is the exact fast tokenizer the data was tokenized with, plus a post-processor that adds
    `<s>` as Llama's tokenizer does; the config names the generic `PreTrainedTokenizerFast`, which every
    `transformers` version loads from `tokenizer.json` as it is (no SentencePiece conversion, whose result
    differs between versions), and carries the training chat template."""
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    bos = tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    special = {"bos_token": bos, "eos_token": tokenizer.eos_token, "unk_token": tokenizer.unk_token}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "pad_token": None,
              "clean_up_tokenization_spaces": False, "padding_side": "left",
              "model_max_length": model_max_length or 4096, "chat_template": llama2_chat_jinja()}
    return {"tokenizer.json": backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def _set_training_chat_template(fs, path: str) -> None:
    """Puts the training chat template into a copied `tokenizer_config.json`, keeping everything else: Meta's
    Llama-2-chat template has no default system prompt, so `apply_chat_template` would not render what the
    model was trained on."""
    with fs.open(path, "r") as f:
        config = json.load(f)
    if config.get("chat_template") != llama2_chat_jinja():
        config["chat_template"] = llama2_chat_jinja()
        _write_text(fs, path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_tokenizer(tokenizer_path: str, output_dir: str, model_max_length: int | None = None) -> list[str]:
    """Write the tokenizer at `tokenizer_path` (a directory, gs:// URL or hub id, as the pipeline resolves it)
    into `output_dir` so `transformers.AutoTokenizer` loads it anywhere; returns the file names.

    A Hugging Face tokenizer directory (with `tokenizer_config.json`) is copied as its authors made it, except
    that its `chat_template` becomes the training one (`llama2_chat_jinja`). A bare SentencePiece `tokenizer.model` (the bundled tokenizer, a Llama 2 download)
    is copied too, and `hf_tokenizer_files` adds what `AutoTokenizer` needs beside it."""
    from data_pipeline.tokenizer import TOKENIZER_FILES, load_tokenizer, resolve_tokenizer_dir

    tokenizer = load_tokenizer(tokenizer_path)  # fails early on something that is not a usable tokenizer
    source = resolve_tokenizer_dir(tokenizer_path)
    fs, root = _fs_and_path(output_dir)
    fs.makedirs(root, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(source, name))]
    for name in copied:
        fs.put(os.path.join(source, name), posixpath.join(root, name))
    if "tokenizer_config.json" in copied:
        _set_training_chat_template(fs, posixpath.join(root, "tokenizer_config.json"))
        return copied
    written = hf_tokenizer_files(tokenizer, model_max_length)
    for name, text in written.items():
        _write_text(fs, posixpath.join(root, name), text)
    return sorted(set(copied) | set(written))
