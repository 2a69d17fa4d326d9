"""Training checkpoints: one orbax `CheckpointManager` directory per run (local or gs://).

    {run_dir}/checkpoints/{step}/
        params/      the model's parameters (pure dict of arrays; what export and generate read)
        optimizer/   {"opt_state", "step"}
        data/        the input iterator's state, one JSON file per process (grain's checkpoint handler)
        config/      JSON: the resolved TrainConfig, the dataset's tasks and tokenizer path

Saves are asynchronous (the arrays are copied to host memory, then written in the background while training
continues) and atomic (orbax writes to a temporary directory and renames it when complete), so a crash
or preemption mid-write leaves the previous checkpoint intact. Every process takes part: each writes the
array shards it holds and its own data-iterator state.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from agentlm_jax.config import CheckpointConfig, ModelConfig, from_dict
from agentlm_jax.training.state import TrainState, abstract_params

log = logging.getLogger(__name__)

PARAMS, OPTIMIZER, DATA, CONFIG = "params", "optimizer", "data", "config"
CHECKPOINTS_SUBDIR = "checkpoints"


def _absolute(directory: str) -> str:
    return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
    """Saves and restores the train state, the data iterator and the run's config (see the module doc)."""

    def __init__(self, directory: str, *, keep: int = CheckpointConfig.keep, async_save: bool = CheckpointConfig.async_save,
                 ocdbt: bool = CheckpointConfig.ocdbt, read_only: bool = False):
        """read_only: for readers (export, generate); nothing is created or deleted. ocdbt: store each process's
        arrays in one OCDBT database (few large files; orbax's default) instead of a file per array chunk."""
        self.directory = _absolute(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                               enable_async_checkpointing=async_save and not read_only)
        handlers = {PARAMS: ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                    OPTIMIZER: ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                    DATA: grain.checkpoint.CheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, run_info: dict[str, Any] | None = None) -> None:
        """Start saving `state` (a training.state.TrainState) at `step`; returns once arrays are on the host."""
        items = {
            PARAMS: ocp.args.StandardSave(state.params),
            OPTIMIZER: ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step}),
            CONFIG: ocp.args.JsonSave(run_info or {}),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """The train state saved at `step`, each array placed on the sharding of `abstract_state`'s leaf
        (ShapeDtypeStructs, see training.state.abstract_train_state); restores `data_iterator` in place."""
        items = {
            PARAMS: ocp.args.StandardRestore(abstract_state.params),
            OPTIMIZER: ocp.args.StandardRestore({"opt_state": abstract_state.opt_state, "step": abstract_state.step}),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        opt = restored[OPTIMIZER]
        return TrainState(step=opt["step"], params=restored[PARAMS], opt_state=opt["opt_state"])

    def run_info(self, step: int | None = None) -> dict[str, Any]:
        """The JSON saved with a checkpoint (latest by default): {"config": ..., "tasks": ..., ...}."""
        step = self._step_or_latest(step)
        return dict(self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG])

    def restore_params(self, step: int | None, abstract_params: dict) -> dict:
        step = self._step_or_latest(step)
        return self.manager.restore(
            step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract_params)}))[PARAMS]

    def _step_or_latest(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}: is it a training run's "
                                        f"`{CHECKPOINTS_SUBDIR}` directory?")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {self.all_steps()}")
        return step

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_checkpoint_dir(path: str) -> str:
    """A run directory or its `checkpoints` subdirectory → the checkpoint manager's directory."""
    from etils import epath

    candidate = epath.Path(_absolute(path)) / CHECKPOINTS_SUBDIR
    return str(candidate) if candidate.exists() else _absolute(path)


def model_config_from_run_info(info: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, info["config"]["model"], "model")


def load_model_params(checkpoint_dir: str, step: int | None = None,
                      shardings: Any | Callable[[nnx.State], Any] | None = None) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params nnx.State) from a training run's checkpoints (latest step by default).

    `checkpoint_dir`: the run's `checkpoints` directory (or the run directory). `shardings`: where to put the
    parameters: a tree of NamedShardings matching the parameters (an nnx.State, e.g. from
    `sharding.state_shardings`, or its pure dict), or a function from the abstract parameters (nnx.State of
    ShapeDtypeStructs) to such a tree; None = all on the first device. Only the parameters are read, never
    the optimizer state.
    """
    with Checkpointer(resolve_checkpoint_dir(checkpoint_dir), read_only=True) as ckpt:
        step = ckpt._step_or_latest(step)
        cfg = model_config_from_run_info(ckpt.run_info(step))
        abstract = abstract_params(cfg)
        if callable(shardings):
            shardings = shardings(abstract)
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract.to_pure_dict())
        elif isinstance(shardings, nnx.State):
            shardings = shardings.to_pure_dict()
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract.to_pure_dict(), shardings)
        params = ckpt.restore_params(step, target)
    log.info("loaded the parameters of step %d from %s", step, checkpoint_dir)
    nnx.replace_by_pure_dict(abstract, params)
    return cfg, abstract


def tokenizer_path(checkpoint_dir: str, step: int | None = None) -> str | None:
    """The tokenizer directory of the dataset the run trained on (from its saved run info), if known."""
    try:
        with Checkpointer(resolve_checkpoint_dir(checkpoint_dir), read_only=True) as ckpt:
            path = ckpt.run_info(step).get("tokenizer_path")
    except FileNotFoundError:
        return None
    if path is None:
        log.warning("the checkpoints in %s do not record a tokenizer path", checkpoint_dir)
    return path
