"""Training checkpoints: one orbax `CheckpointManager` directory per run (local or gs://).

    {run_dir}/checkpoints/{step}/
        params/      the model's parameters (pure dict of arrays; what export and generate read)
        optimizer/   {"opt_state", "step"}
        data/        the input iterator's state, one JSON file per process (grain's checkpoint handler)
        config/      JSON: the resolved TrainConfig, the dataset's tasks and tokenizer path

        checksums.json  size and CRC32C of every file above, written before orbax commits the step

Saves are asynchronous (the arrays are copied to host memory, then written in the background while training
continues) and atomic (orbax writes to a temporary directory and renames it when complete), so a crash
or preemption mid-write leaves the previous checkpoint intact. Every process takes part: each writes the
array shards it holds and its own data-iterator state.

Integrity: once every process has written its files, process 0 records the size and CRC32C of each one in
`checksums.json`, in orbax's background thread and before the commit, so a committed step always has one
(a step without it was written before checksums existed). Reads verify the files they need against it first
(on gs:// from the object metadata, where GCS keeps each object's CRC32C; locally by reading the bytes), and
a damaged step is named with its file; `restore_latest` then falls back to the previous step.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import os
import posixpath
import time
from typing import Any, Callable, NamedTuple

import fsspec
import google_crc32c
import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from agentlm_jax.config import CheckpointConfig, ModelConfig, from_dict
from agentlm_jax.errors import SetupError
from agentlm_jax.training.state import TrainState, abstract_params

log = logging.getLogger(__name__)

PARAMS, OPTIMIZER, DATA, CONFIG = "params", "optimizer", "data", "config"
CHECKPOINTS_SUBDIR = "checkpoints"
CHECKSUMS = "checksums.json"
DAMAGED_SUBDIR = "damaged"  # where restore_latest moves the damaged steps it skipped (a step number is reused)
_READ_CHUNK = 16 << 20


class CheckpointDamagedError(SetupError):
    """A step's files differ from the checksums saved with it, or (a step saved without checksums) cannot be read."""

    def __init__(self, step: int, problems: list[str]):
        self.step, self.problems = step, problems
        super().__init__(f"the checkpoint of step {step} is damaged: " + "; ".join(problems))


class NoUsableCheckpointError(SetupError):
    """Every checkpoint of a run is damaged."""


class Restored(NamedTuple):
    step: int
    state: TrainState


def _absolute(directory: str) -> str:
    return directory if "://" in directory else os.path.abspath(directory)


def _crc32c_of_file(fs, path: str) -> str:
    crc = google_crc32c.Checksum()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc.update(chunk)
    return base64.b64encode(crc.digest()).decode("ascii")  # GCS's encoding of an object's crc32c


def _file_checksums(url: str, wanted: Callable[[str], bool] = lambda rel: True) -> dict[str, dict[str, Any]]:
    """{path relative to `url`: {"size", "crc32c"}} of the files under `url` (missing ones are absent). On GCS
    the CRC32C comes from the object's metadata (GCS computes it on upload); elsewhere the bytes are read."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(root)  # orbax wrote these through tensorstore, not this fsspec instance
    files = {posixpath.relpath(path, root): info for path, info in fs.find(root, detail=True).items()
             if info.get("type") == "file"}
    files = {rel: info for rel, info in files.items() if rel != CHECKSUMS and wanted(rel)}

    def checksum(item):
        rel, info = item
        return rel, {"size": int(info["size"]),
                     "crc32c": info.get("crc32c") or _crc32c_of_file(fs, posixpath.join(root, rel))}

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return dict(sorted(pool.map(checksum, files.items())))


def write_checksums(step_dir: str) -> None:
    """Record the size and CRC32C of every file of the items under `step_dir` in `step_dir`/checksums.json.
    The step's own files (_CHECKPOINT_METADATA, commit_success.txt) are left out: orbax rewrites them at commit."""
    manifest = {"algorithm": "crc32c", "files": _file_checksums(step_dir, lambda rel: "/" in rel)}
    with fsspec.open(posixpath.join(step_dir, CHECKSUMS), "w") as f:
        json.dump(manifest, f, indent=0)


class Checkpointer:
    """Saves and restores the train state, the data iterator and the run's config (see the module doc)."""

    def __init__(self, directory: str, *, keep: int = CheckpointConfig.keep, async_save: bool = CheckpointConfig.async_save,
                 ocdbt: bool = CheckpointConfig.ocdbt, read_only: bool = False):
        """read_only: for readers (export, generate); nothing is created or deleted. ocdbt: store each process's
        arrays in one OCDBT database (few large files; orbax's default) instead of a file per array chunk."""
        self.directory = _absolute(directory)
        self.async_save = async_save
        self.read_only = read_only
        self._saving_step: int | None = None
        self._verified: dict[int, set[str]] = {}  # step -> items whose files matched their checksums
        self._damaged: dict[int, CheckpointDamagedError] = {}
        self._unverified: set[int] = set()  # steps without checksums.json, already warned about
        # Saves always go through orbax's background thread, whose post-finalization callback (run on the
        # primary process once every process has written, before the commit) writes checksums.json; a
        # synchronous save waits for it.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only, enable_async_checkpointing=not read_only,
            async_options=None if read_only else ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
        handlers = {PARAMS: ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                    OPTIMIZER: ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                    DATA: grain.checkpoint.CheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest committed step, damaged or not (see `usable_step` and `restore_latest`)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return posixpath.join(self.directory, ocp.step.standard_name_format().build_name(step))

    def save(self, step: int, state, data_iterator=None, run_info: dict[str, Any] | None = None) -> None:
        """Start saving `state` (a training.state.TrainState) at `step`; returns once arrays are on the host
        (with async_save=False: once the checkpoint and its checksums are written)."""
        items = {
            PARAMS: ocp.args.StandardSave(state.params),
            OPTIMIZER: ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step}),
            CONFIG: ocp.args.JsonSave(run_info or {}),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.wait_until_finished()  # orbax would too; the callback below must see only this step
        self._saving_step = step
        self._save_started, self._save_bytes = time.monotonic(), _host_bytes(state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if self.async_save:
            log.info("checkpoint of step %d: %.2f GB from this host, writing in the background (training waited "
                     "%.1f s)", step, self._save_bytes / 1e9, time.monotonic() - self._save_started)
        else:
            self.manager.wait_until_finished()

    def _write_checksums(self) -> None:
        """orbax's post-finalization callback: checksums.json in the step's not yet committed directory (the
        temporary one on a local disk; on GCS the final one, committed by its commit_success.txt)."""
        step, final = self._saving_step, self.step_dir(self._saving_step)
        try:
            start = time.monotonic()
            for step_dir in (final + ocp.path.atomicity.TMP_DIR_SUFFIX, final):
                fs, root = fsspec.core.url_to_fs(step_dir)
                fs.invalidate_cache(root)
                if fs.isdir(root):
                    seconds = time.monotonic() - self._save_started
                    log.info("checkpoint of step %d written in %.1f s (%.2f GB from this host: %.2f GB/s)", step,
                             seconds, self._save_bytes / 1e9, self._save_bytes / 1e9 / max(seconds, 1e-9))
                    write_checksums(step_dir)
                    log.debug("checksums of step %d written in %.1f s", step, time.monotonic() - start)
                    return
            raise FileNotFoundError(f"neither {final}{ocp.path.atomicity.TMP_DIR_SUFFIX} nor {final} exists")
        except Exception as e:  # noqa: BLE001 - the checkpoint itself is complete; failing its save would be worse
            log.error("could not write %s for the checkpoint of step %d (%s: %s): it is saved, but a restore "
                      "cannot verify its files", CHECKSUMS, step, type(e).__name__, e)

    # ------------------------------------------------------------------------------------------ verifying
    def verify(self, step: int, items: tuple[str, ...] = (PARAMS, OPTIMIZER, DATA, CONFIG)) -> bool:
        """Check the files of `items` against the step's checksums.json.

        True: they match. False: the step has no checksums.json (saved before checksums existed), so there is
        nothing to check against. Raises CheckpointDamagedError naming each missing, truncated or altered file.
        """
        if step in self._damaged:
            raise self._damaged[step]
        if set(items) <= self._verified.get(step, set()):
            return True
        step_dir = self.step_dir(step)
        fs, root = fsspec.core.url_to_fs(step_dir)
        manifest_path = posixpath.join(step_dir, CHECKSUMS)
        try:
            manifest = json.loads(fs.cat_file(posixpath.join(root, CHECKSUMS)))
            expected = {rel: (int(e["size"]), e["crc32c"]) for rel, e in manifest["files"].items()}
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._fail(step, [f"{manifest_path} cannot be read ({type(e).__name__}: {e})"])
        wanted = lambda rel: rel.split("/", 1)[0] in items  # noqa: E731
        actual = _file_checksums(step_dir, wanted)
        problems = []
        for rel, (size, crc) in expected.items():
            if not wanted(rel):
                continue
            path = posixpath.join(step_dir, rel)
            if rel not in actual:
                problems.append(f"{path} is missing")
            elif actual[rel]["size"] != size:
                problems.append(f"{path} has {actual[rel]['size']} bytes, but {size} were written (truncated or "
                                f"overwritten)")
            elif actual[rel]["crc32c"] != crc:
                problems.append(f"{path} does not match the checksum saved with it (crc32c {actual[rel]['crc32c']}"
                                f", saved {crc}): its bytes changed after the save")
        if problems:
            self._fail(step, problems)
        self._verified.setdefault(step, set()).update(items)
        return True

    def _fail(self, step: int, problems: list[str]):
        self._damaged[step] = CheckpointDamagedError(step, problems)
        raise self._damaged[step]

    def _read(self, step: int, items: tuple[str, ...], read: Callable[[], Any]) -> Any:
        """`read()` after verifying `items` of `step`. A step without checksums that orbax or grain cannot read
        is reported as damaged too; with checksums that matched, a read error is not damage and propagates."""
        if self.verify(step, items):
            return read()
        if step not in self._unverified:
            self._unverified.add(step)
            log.warning("the checkpoint of step %d has no %s (saved before checksums existed): reading it "
                        "unverified", step, CHECKSUMS)
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - whatever orbax, tensorstore or grain raise for unreadable files
            self._damaged[step] = CheckpointDamagedError(
                step, [f"{self.step_dir(step)} cannot be read ({type(e).__name__}: {e})"])
            raise self._damaged[step] from e

    def usable_step(self, step: int | None = None,
                    items: tuple[str, ...] = (PARAMS, OPTIMIZER, DATA, CONFIG)) -> int | None:
        """The newest step (at most `step`) whose files of `items` match their checksums, or that has none;
        each damaged newer step is logged with its files. None if there is no checkpoint at all; raises
        NoUsableCheckpointError if every one is damaged."""
        steps = sorted((s for s in self.all_steps() if step is None or s <= step), reverse=True)
        if not steps:
            return None
        for s in steps:
            try:
                self.verify(s, items)
                return s
            except CheckpointDamagedError as e:
                self._warn_fallback(e, steps)
        self._no_usable_checkpoint()

    def _warn_fallback(self, error: CheckpointDamagedError, steps: list[int]) -> None:
        older = [s for s in steps if s < error.step]
        log.warning("%s. %s", error, f"Trying the previous checkpoint (step {older[0]})" if older
                    else "There is no older checkpoint")

    def _no_usable_checkpoint(self):
        damaged = [str(self._damaged[s]) for s in sorted(self._damaged, reverse=True)]
        raise NoUsableCheckpointError(
            f"no usable checkpoint in {self.directory}: " + ". ".join(damaged) + ". Restore the damaged files "
            f"from a copy, or move the step directories away to start the run again from its beginning")

    # ------------------------------------------------------------------------------------------ restoring
    def restore(self, step: int, abstract_state, data_iterator=None):
        """The train state saved at `step`, each array placed on the sharding of `abstract_state`'s leaf
        (ShapeDtypeStructs, see training.state.abstract_train_state); restores `data_iterator` in place.
        Verifies the files first (CheckpointDamagedError names the damaged ones)."""
        items = {
            PARAMS: ocp.args.StandardRestore(abstract_state.params),
            OPTIMIZER: ocp.args.StandardRestore({"opt_state": abstract_state.opt_state, "step": abstract_state.step}),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._read(step, tuple(items),
                              lambda: self.manager.restore(step, args=ocp.args.Composite(**items)))
        opt = restored[OPTIMIZER]
        return TrainState(step=opt["step"], params=restored[PARAMS], opt_state=opt["opt_state"])

    def restore_latest(self, abstract_state, data_iterator=None) -> Restored | None:
        """The newest checkpoint that is intact, restored (as `restore`); None if there is none at all.

        A damaged step is logged (its files and what is wrong) and the previous one is tried. When an older step
        is restored, the damaged newer ones are moved to `checkpoints/damaged/` (the run will save those step
        numbers again). Raises NoUsableCheckpointError if every checkpoint is damaged.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        for step in steps:
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except CheckpointDamagedError as e:
                self._warn_fallback(e, steps)
                continue
            skipped = [s for s in steps if s > step]
            if skipped:
                log.warning("resumed from the checkpoint of step %d: the newer one(s) of step(s) %s are damaged",
                            step, skipped)
                self._set_aside(skipped)
            return Restored(step, state)
        self._no_usable_checkpoint()

    def _set_aside(self, steps: list[int]) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            for step in steps:
                fs, src = fsspec.core.url_to_fs(self.step_dir(step))
                dst = posixpath.join(posixpath.dirname(src), DAMAGED_SUBDIR, f"{step}-{int(time.time())}")
                fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                fs.mv(src, dst, recursive=True)
                log.warning("moved the damaged checkpoint of step %d to %s; delete it once you no longer need it",
                            step, dst)
        multihost_utils.sync_global_devices("agentlm_jax: damaged checkpoints set aside")
        self.manager.reload()

    def run_info(self, step: int | None = None) -> dict[str, Any]:
        """The JSON saved with a checkpoint (latest by default): {"config": ..., "tasks": ..., ...}."""
        step = self._step_or_latest(step)
        return dict(self._read(step, (CONFIG,), lambda: self.manager.restore(
            step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})))[CONFIG])

    def restore_params(self, step: int | None, abstract_params: dict) -> dict:
        step = self._step_or_latest(step)
        return self._read(step, (PARAMS,), lambda: self.manager.restore(
            step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract_params)})))[PARAMS]

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


def lora_config_from_run_info(info: dict[str, Any]):
    """The run's LoraConfig (disabled for runs saved before LoRA existed)."""
    from agentlm_jax.config.schema import LoraConfig

    return from_dict(LoraConfig, info["config"].get("lora") or {}, "lora")


def _mesh_of(shardings: Any):
    from jax.sharding import NamedSharding

    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def load_lora_checkpoint(ckpt: "Checkpointer", step: int, info: dict[str, Any], shardings: Any = None
                         ) -> tuple[Any, dict, dict]:
    """(TrainConfig, adapters, frozen base) of a LoRA run's checkpoint: the adapters restored, the base loaded
    from the reference the run recorded (its init_from, or its random seed) and checked against its content
    hash. `shardings`: as for `load_model_params` (a function of the abstract parameters, or None)."""
    from agentlm_jax.config import TrainConfig
    from agentlm_jax.hf.load import default_mesh
    from agentlm_jax.lora import check_base, load_base
    from agentlm_jax.sharding import state_shardings

    run_cfg = from_dict(TrainConfig, info["config"])
    abstract = abstract_params(run_cfg.model, run_cfg.lora)
    if callable(shardings):
        target_s = shardings(abstract)
        mesh = _mesh_of(target_s)
    else:
        mesh = _mesh_of(shardings) if shardings is not None else None
        mesh = mesh or default_mesh()
        target_s = state_shardings(abstract, mesh, run_cfg.mesh.rules)
    if isinstance(target_s, nnx.State):
        target_s = target_s.to_pure_dict()
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract.to_pure_dict(), target_s)
    adapters = ckpt.restore_params(step, target)
    base, base_info = load_base(run_cfg, mesh, run_cfg.mesh.rules, show_progress=False)
    check_base(info.get("lora_base"), base_info, f"the LoRA checkpoint of step {step} in {ckpt.directory}")
    return run_cfg, adapters, base


def load_model_params(checkpoint_dir: str, step: int | None = None,
                      shardings: Any | Callable[[nnx.State], Any] | None = None) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params nnx.State) from a training run's checkpoints (latest step by default).

    `checkpoint_dir`: the run's `checkpoints` directory (or the run directory). `shardings`: where to put the
    parameters: a tree of NamedShardings matching the parameters (an nnx.State, e.g. from
    `sharding.state_shardings`, or its pure dict), or a function from the abstract parameters (nnx.State of
    ShapeDtypeStructs) to such a tree; None = all on the first device. Only the parameters are read, never
    the optimizer state. Their files are verified against the checksums saved with them first: a damaged
    `step` is an error (CheckpointDamagedError, naming the files); by default the newest intact step is used.
    A LoRA run's checkpoint gives the merged model (base + alpha/r · A·B), its base loaded from the run's
    reference (and refused if its content hash differs from the recorded one).
    """
    with Checkpointer(resolve_checkpoint_dir(checkpoint_dir), read_only=True) as ckpt:
        if step is None:
            step = ckpt.usable_step(items=(CONFIG, PARAMS))  # None if there is no checkpoint: raised just below
        step = ckpt._step_or_latest(step)
        info = ckpt.run_info(step)
        cfg = model_config_from_run_info(info)
        if lora_config_from_run_info(info).enabled:  # adapters over a frozen base: merged into the plain model
            import jax.numpy as jnp

            from agentlm_jax.model.lora import merged_params

            run_cfg, adapters, base = load_lora_checkpoint(ckpt, step, info, shardings)
            dtype = jnp.promote_types(jnp.dtype(run_cfg.lora.base_dtype), jnp.dtype(cfg.param_dtype))
            merged = jax.jit(lambda b, a: merged_params(b, a, cfg, run_cfg.lora, dtype))(base, adapters)
            abstract = abstract_params(cfg)
            nnx.replace_by_pure_dict(abstract, merged)
            log.info("loaded the LoRA adapters of step %d from %s, merged into their base", step, checkpoint_dir)
            return cfg, abstract
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
            if step is None:
                step = ckpt.usable_step(items=(CONFIG,))
            path = ckpt.run_info(step).get("tokenizer_path")
    except FileNotFoundError:
        return None
    if path is None:
        log.warning("the checkpoints in %s do not record a tokenizer path", checkpoint_dir)
    return path


def _host_bytes(state) -> int:
    """Bytes of the arrays this host writes: one replica of each shard it holds."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)
               for shard in leaf.addressable_shards if shard.replica_id == 0)
