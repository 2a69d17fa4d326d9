"""A trained model wherever it is: a Hugging Face directory or a training run's orbax checkpoints (local or gs://).

    cfg, params = load_params("runs/tiny/checkpoints", mesh=mesh)     # or an HF dir; --step for checkpoints
    cfg, model = load_model("runs/tiny/hf", dtype="bfloat16")          # for inference
    tokenizer_dir = default_tokenizer("runs/tiny")                      # the one that goes with it
"""

from __future__ import annotations

import argparse
import posixpath
from typing import Any

import fsspec
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from agentlm_jax.config import DEFAULT_RULES, ModelConfig, Rules
from agentlm_jax.errors import ConfigError, MissingInputError
from agentlm_jax.hf import CONFIG_NAME, import_hf
from agentlm_jax.model.llama import Llama, abstract_model
from agentlm_jax.sharding import state_shardings
from agentlm_jax.training.checkpointing import CHECKPOINTS_SUBDIR, load_model_params, tokenizer_path


def is_hf_dir(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(posixpath.join(root, CONFIG_NAME))


def checkpoint_steps(source: str) -> list[int] | None:
    """The steps of a training run's checkpoint directory (`{run_dir}/checkpoints` or the run directory), read
    from the directory listing alone; None if `source` holds no step directories."""
    fs, root = fsspec.core.url_to_fs(source)
    for directory in (posixpath.join(root, CHECKPOINTS_SUBDIR), root):
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(directory, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        steps = sorted(int(n) for n in names if n.isdigit())  # orbax's unfinished saves are `N.orbax-checkpoint-tmp-*`
        if steps:
            return steps
    return None


def step_arg(text: str) -> int:
    """argparse type of --step: a checkpoint step, an integer >= 0."""
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step number: {text!r}") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"a step is >= 0, got {step}")
    return step


def check_tokenizer(path: str, *, what: str = "--tokenizer") -> None:
    """MissingInputError unless `path` is an existing tokenizer directory or file (local or gs://); a hub id
    (owner/name, not a local path) is left to the pipeline's tokenizer loader, which downloads it."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        if "://" not in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
            return
        raise MissingInputError(f"{what} {path}: does not exist; pass --tokenizer DIR (a directory with "
                                f"tokenizer.model or tokenizer.json)")
    if fs.isdir(root) and not any(fs.exists(posixpath.join(root, n)) for n in ("tokenizer.model", "tokenizer.json")):
        raise MissingInputError(f"{what} {path}: no tokenizer.model or tokenizer.json in it; pass --tokenizer DIR")


def check_source(source: str, *, step: int | None = None, flag: str = "--model") -> str:
    """'hf' or 'orbax' for a model source, checked from its listing before anything heavy (orbax, jax) runs;
    MissingInputError / ConfigError saying what is wrong with `flag`'s value and what to give instead."""
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        raise MissingInputError(f"{flag} {source}: does not exist; give a Hugging Face model directory or a "
                                f"training run's checkpoint directory (local or gs://)")
    if fs.isfile(root):
        raise MissingInputError(f"{flag} {source}: is a file; give the directory that holds it")
    if is_hf_dir(source):
        if step is not None:
            raise ConfigError(f"--step applies to orbax checkpoints; {flag} {source} is a Hugging Face directory")
        return "hf"
    steps = checkpoint_steps(source)
    if steps is None:
        raise MissingInputError(f"{flag} {source}: neither a Hugging Face model directory (no {CONFIG_NAME}) nor a "
                                f"training run's checkpoint directory (no step directories in it or in its "
                                f"{CHECKPOINTS_SUBDIR}/)")
    if step is not None and step not in steps:
        raise MissingInputError(f"--step {step}: no checkpoint for that step in {source}; available steps: {steps}")
    return "orbax"


def load_params(source: str, *, step: int | None = None, runtime: dict[str, Any] | None = None,
                mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                allow_pickle: bool = False, show_progress: bool = True) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params) from a Hugging Face directory or a training run's orbax checkpoint directory;
    `runtime` overrides how the model runs (e.g. {"dtype": "bfloat16"}), never its architecture."""
    if is_hf_dir(source):
        if step is not None:
            raise ConfigError(f"--step applies to orbax checkpoints; {source} is a Hugging Face directory")
        return import_hf(source, runtime=runtime, mesh=mesh, rules=rules, allow_pickle=allow_pickle,
                         show_progress=show_progress)
    shardings = None
    if mesh is not None:
        shardings = lambda abstract_params: state_shardings(abstract_params, mesh, rules)  # noqa: E731
    try:
        cfg, params = load_model_params(source, step=step, shardings=shardings)
    except FileNotFoundError as e:  # e.g. a step whose save never completed (on gs:// its directory exists)
        raise MissingInputError(str(e)) from None
    cfg = cfg.replace(**(runtime or {}))
    stored = {x.dtype for x in jax.tree.leaves(params)}
    if stored != {jnp.dtype(cfg.param_dtype)}:  # e.g. float32 master weights, served in bfloat16
        params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    return cfg, params


def load_model(source: str, *, step: int | None = None, dtype: str = "float32",
               mesh: Mesh | None = None, show_progress: bool = True) -> tuple[ModelConfig, Llama]:
    """A Llama for inference (parameters stored in the compute dtype, sharded over `mesh` if given)."""
    cfg, params = load_params(source, step=step, runtime={"dtype": dtype, "param_dtype": dtype}, mesh=mesh,
                              show_progress=show_progress)
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
