"""A trained model wherever it is: a Hugging Face directory or a training run's orbax checkpoints (local or gs://).

    cfg, params = load_params("runs/tiny/checkpoints", mesh=mesh)     # or an HF dir; --step for checkpoints
    cfg, model = load_model("runs/tiny/hf", dtype="bfloat16")          # for inference
    tokenizer_dir = default_tokenizer("runs/tiny")                      # the one that goes with it
"""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from agentlm_jax.config import DEFAULT_RULES, ModelConfig, Rules
from agentlm_jax.hf import CONFIG_NAME, import_hf
from agentlm_jax.model.llama import Llama, abstract_model
from agentlm_jax.sharding import state_shardings
from agentlm_jax.training.checkpointing import load_model_params, tokenizer_path


def is_hf_dir(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(posixpath.join(root, CONFIG_NAME))


def load_params(source: str, *, step: int | None = None, runtime: dict[str, Any] | None = None,
                mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                allow_pickle: bool = False) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params) from a Hugging Face directory or a training run's orbax checkpoint directory;
    `runtime` overrides how the model runs (e.g. {"dtype": "bfloat16"}), never its architecture."""
    if is_hf_dir(source):
        if step is not None:
            raise ValueError(f"--step applies to orbax checkpoints; {source} is a Hugging Face directory")
        return import_hf(source, runtime=runtime, mesh=mesh, rules=rules, allow_pickle=allow_pickle)
    shardings = None
    if mesh is not None:
        shardings = lambda abstract_params: state_shardings(abstract_params, mesh, rules)  # noqa: E731
    cfg, params = load_model_params(source, step=step, shardings=shardings)
    cfg = cfg.replace(**(runtime or {}))
    stored = {x.dtype for x in jax.tree.leaves(params)}
    if stored != {jnp.dtype(cfg.param_dtype)}:  # e.g. float32 master weights, served in bfloat16
        params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    return cfg, params


def load_model(source: str, *, step: int | None = None, dtype: str = "float32",
               mesh: Mesh | None = None) -> tuple[ModelConfig, Llama]:
    """A Llama for inference (parameters stored in the compute dtype, sharded over `mesh` if given)."""
    cfg, params = load_params(source, step=step, runtime={"dtype": dtype, "param_dtype": dtype}, mesh=mesh)
    graphdef, _ = nnx.split(abstract_model(cfg))
    return cfg, nnx.merge(graphdef, params)


def default_tokenizer(source: str, *, step: int | None = None) -> str | None:
    """The tokenizer that goes with a model source: a Hugging Face directory's own tokenizer files, or the
    tokenizer the training run recorded in its checkpoint; None if neither is known."""
    if is_hf_dir(source):
        fs, root = fsspec.core.url_to_fs(source)
        has_files = any(fs.exists(posixpath.join(root, n)) for n in ("tokenizer.json", "tokenizer.model"))
        return source if has_files else None
    return tokenizer_path(source, step)
