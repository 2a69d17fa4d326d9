"""Import a Hugging Face Llama or Qwen2 checkpoint (local or `gs://`) onto a mesh, without PyTorch.

`config.json` + `model.safetensors` or sharded `model-*.safetensors` with `model.safetensors.index.json`.
Every tensor's name and shape is checked against the architecture before anything is loaded (missing /
unexpected / mis-shaped tensors are named in one error). Tensors are then read one at a time and placed
directly onto their target sharding with `jax.make_array_from_callback` (each device receives only its slice).
The stacked per-layer parameters ([L, ...], from `nnx.scan`) are assembled on the devices: a zero-filled
sharded [L, ...] buffer is updated in place (donated) one layer at a time, so the host never holds more than
one tensor in a few forms and never a stacked [L, ...] copy. Peak host memory beyond the parameters' own
device buffers ≈ 3 × the largest single tensor in the parameter dtype (its file-dtype copy, the cast, the
transposed copy; for Llama 2 in float32 that tensor is the 32000×D embedding / output head: ≈ 1.6 GB at 7B,
≈ 3.1 GB at 70B), independent of the number of layers, plus the memory-mapped file's pages (page cache,
reclaimable).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agentlm_jax.config import DEFAULT_RULES, RUNTIME_FIELDS, MeshConfig, ModelConfig, Rules
from agentlm_jax.hf import files
from agentlm_jax.hf.config import FAMILIES, check_architecture, load_hf_config
from agentlm_jax.hf.mapping import Entry, check_tensors, get_path, ignored_tensors, set_path, tensor_entries
from agentlm_jax.model.llama import Llama, abstract_model
from agentlm_jax.progress import Progress
from agentlm_jax.sharding import make_mesh, state_shardings


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
    or call `load_hf_model`. `show_progress`: a progress bar (plain log lines off a terminal); False for none.
    """
    settings = {f: getattr(base or ModelConfig(), f) for f in RUNTIME_FIELDS} | dict(runtime or {})
    cfg = load_hf_config(model_dir, **settings)
    if base is not None:
        check_architecture(cfg, base, model_dir)
    mesh = mesh or default_mesh()
    abstract = nnx.state(abstract_model(cfg), nnx.Param)
    shardings = state_shardings(abstract, mesh, rules).to_pure_dict()
    entries = tensor_entries(cfg, abstract.to_pure_dict())

    fs, root = files.fs_and_path(model_dir)
    fmt, file_of = files.weight_files(fs, root, allow_pickle)
    check_tensors({e.name: e.hf_shape for e in entries}, files.tensor_shapes(fs, fmt, file_of), model_dir,
                  ignored=ignored_tensors(cfg), architecture=FAMILIES[cfg.architecture][2])

    placer = _Placer(abstract.to_pure_dict(), shardings, jnp.dtype(cfg.param_dtype))
    by_name = {e.name: e for e in entries}
    by_file: dict[str, list[str]] = {}
    for e in entries:
        by_file.setdefault(file_of[e.name], []).append(e.name)
    with Progress(total=len(entries), desc=f"import {model_dir}", unit="tensor", enabled=show_progress) as bar:
        for path, names in by_file.items():
            for name, array in files.iter_file_tensors(fs, fmt, path, names):
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
        sharding: NamedSharding = get_path(self.shardings, entry.path)
        host = np.ascontiguousarray(entry.tmap.to_ours(hf_array.astype(self.dtype), entry.shape))
        if entry.layer is None:
            set_path(self.out, entry.path, jax.make_array_from_callback(host.shape, sharding, lambda i: host[i]))
            return
        layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        layer = jax.make_array_from_callback(host.shape, layer_sharding, lambda i: host[i])
        stacked = get_path(self.out, entry.path)
        if stacked is None:
            shape = get_path(self.abstract, entry.path).shape
            stacked = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)()
        if entry.path not in self._set_layer:
            self._set_layer[entry.path] = jax.jit(
                lambda s, x, i: jax.lax.dynamic_update_index_in_dim(s, x, i, axis=0),
                donate_argnums=0, out_shardings=sharding)
        set_path(self.out, entry.path, self._set_layer[entry.path](stacked, layer, entry.layer))

    def result(self) -> dict:
        return self.out
