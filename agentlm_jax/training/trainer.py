"""The training loop: data → jitted step → metrics, validation, checkpoints, preemption, export.

    result = Trainer(load_config("configs/llama2-7b.yaml")).run()

A run directory holds everything of one run (local or gs://):
    config.yaml      the resolved config (also saved inside every checkpoint)
    checkpoints/     orbax checkpoints (checkpointing.py); a rerun resumes from the latest
    metrics.jsonl    one JSON object per logged step / evaluation (validation loss, eval/* suites)
    tensorboard/     TensorBoard event files
    tokenizer/       the dataset's tokenizer, copied at the start (run_dir.py)
    logs/            each worker's log of each start
    hf/              the Hugging Face export at the end (export.enabled)

Before anything is written, a trainer takes the run directory's lock and, when it resumes, checks that the
checkpoint's run can continue with this config and dataset (run_dir.py); a refused resume changes nothing.

The loop never waits for the device without need: step k+1 is dispatched before step k's metrics are
fetched, so the host prepares the next batch while the device computes. Every step's loss is checked; a
NaN/Inf stops the run before anything from that step is saved, so the last checkpoint stays good.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import posixpath
import weakref
from typing import Any

import fsspec
import jax
import jax.numpy as jnp
from flax import nnx

from agentlm_jax import distributed
from agentlm_jax.config import DataConfig, TrainConfig, to_dict, to_yaml
from agentlm_jax.data import iterator
from agentlm_jax.data.host_shard import host_batch_to_global
from agentlm_jax.errors import ConfigError, ExistingRunError, MissingInputError, TrainingDivergedError
from agentlm_jax.model.llama import count_params, init_model
from agentlm_jax.progress import Progress
from agentlm_jax.sharding import make_mesh
from agentlm_jax.training.checkpointing import CONFIG, Checkpointer
from agentlm_jax.training.loss import mean
from agentlm_jax.training.metrics import MetricsWriter, Throughput, flops_per_token, peak_flops
from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
from agentlm_jax.training.run_dir import Every, RunLock, WorkerLog, check_resume, copy_tokenizer, data_identity, \
    run_tokenizer_dir, write_config
from agentlm_jax.training.state import TrainState, abstract_params, abstract_train_state, base_shardings, \
    init_train_state, train_state_shardings
from agentlm_jax.training.step import TrainStep, check_batch_layout
from data_pipeline.formats.dataset import has_manifest, load_manifest, manifest_tokenizer_path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM, as a shell reports a process ended by SIGTERM


@dataclasses.dataclass
class RunResult:
    status: str  # "finished" | "preempted"
    step: int  # the step the run ended at (= the last checkpoint's)
    run_dir: str
    first_loss: float | None = None  # training loss of the first step of this invocation
    last_loss: float | None = None  # training loss of the last step
    validation: dict[str, float] | None = None  # the last evaluation
    agent_eval: dict[str, float] | None = None  # the last in-loop evaluation (eval.*)
    eval_failures: int = 0  # in-loop evaluations that failed (logged; training went on)
    export_path: str | None = None


def prepare_dataset(path: str) -> str:
    """`path` if it holds a dataset; the bundled sample dataset is built there when it is the default path."""
    if has_manifest(path):
        return path
    if path != DataConfig().path:
        raise MissingInputError(f"no dataset at {path} (no manifest.json): build one with "
                                f"`python -m data_pipeline.build --output {path} ...` or set data.path")
    log.info("%s is missing: building the bundled sample dataset there (python -m data_pipeline.build)", path)
    import data_pipeline

    data_pipeline.build_sample_dataset(path, overwrite=True)  # no manifest: never a complete dataset
    return path


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@jax.jit
def _all_finite(state: TrainState) -> jax.Array:
    leaves = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _drop_empty_group_losses(values: dict[str, float]) -> None:
    """A batch without agent (or general) loss tokens has no agent (general) loss: drop the key, not log 0."""
    if values["agent_loss_tokens"] == 0:
        values.pop("agent_loss")
    if values["loss_tokens"] == values["agent_loss_tokens"]:
        values.pop("general_loss")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        """Checks what can fail before any heavy work (mesh, batch layout, dataset, existing checkpoints), then
        builds the optimizer, the step and the input pipeline. Nothing is compiled yet."""
        distributed.initialize(cfg.distributed)
        self.cfg = cfg
        self.is_main = distributed.is_main_process()
        m = cfg.mesh
        try:
            self.mesh = make_mesh(m)
        except ConfigError as e:
            raise ConfigError(f"{e}: set mesh.data, mesh.fsdp and mesh.tensor so that their product is the "
                              f"{jax.device_count()} devices (one of them may be -1)") from None
        self.rules = m.rules
        try:
            check_batch_layout(cfg.data.global_batch, cfg.data.micro_batches, self.mesh, self.rules)
        except ValueError as e:
            raise ConfigError(f"{e}, or put fewer devices on the batch axes (mesh {dict(self.mesh.shape)}, from "
                              f"mesh.data={m.data} mesh.fsdp={m.fsdp} mesh.tensor={m.tensor}), e.g. more on "
                              f"mesh.tensor") from None
        self.data_dir = prepare_dataset(cfg.data.path)
        try:
            self.manifest = load_manifest(self.data_dir)
        except FileNotFoundError as e:
            raise MissingInputError(str(e)) from None
        self.tasks = list(self.manifest["tasks"])
        vocab = (self.manifest.get("tokenizer") or {}).get("vocab_size")
        if vocab and vocab > cfg.model.vocab_size:
            raise ConfigError(f"the dataset's tokenizer ({self.data_dir}) has {vocab} tokens but model.vocab_size "
                              f"is {cfg.model.vocab_size}: set model.vocab_size={vocab} (or use a model config "
                              f"made for this tokenizer)")
        self.tokenizer_dir = self._check_tokenizer()
        from agentlm_jax.hf.save import check_output, parse_size

        if cfg.export.enabled:  # a bad export setting shows now, not after the last step
            try:
                parse_size(cfg.export.max_shard_size)
            except ConfigError as e:
                raise ConfigError(f"export.max_shard_size: {e}") from None
            check_output(cfg.export_path, overwrite=True, flag="export.path")
        self.identity = data_identity(self.manifest)
        # LoRA: the state's params are the adapters; the frozen base is loaded when the run starts (load_base)
        self.lora = cfg.lora if cfg.lora.enabled else None
        self.base_info: dict | None = None
        if self.lora is not None:
            self._check_lora_inputs()
            if cfg.export.enabled:
                check_output(cfg.adapter_path, overwrite=True, flag="lora.adapter_path")

        self.optimizer = make_optimizer(cfg.optimizer, cfg.steps, abstract_params(cfg.model, self.lora))
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.steps)
        self.shardings = train_state_shardings(cfg.model, self.optimizer, self.mesh, self.rules, lora=self.lora)
        self.step_fn = TrainStep(cfg.model, self.optimizer, self.schedule, mesh=self.mesh, rules=self.rules,
                                 state_shardings=self.shardings, data=cfg.data, loss=cfg.loss,
                                 num_tasks=len(self.tasks), lora=self.lora, seed=cfg.seed,
                                 base_shardings=base_shardings(cfg.model, self.lora, self.mesh, self.rules)
                                 if self.lora else None)
        self.lock = RunLock(cfg.run_dir).acquire() if self.is_main else None
        self._release_lock = weakref.finalize(self, self.lock.release) if self.lock else lambda: None
        try:
            self.checkpointer = Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep,
                                             async_save=cfg.checkpoint.async_save, ocdbt=cfg.checkpoint.ocdbt)
        except BaseException:
            self._release_lock()
            raise
        try:
            latest = self.checkpointer.latest_step()
            self._refuse_existing_run(latest)
            if latest is not None:  # the newest step whose saved config is intact (damaged ones are logged)
                latest = self.checkpointer.usable_step(items=(CONFIG,))
                check_resume(self.checkpointer.run_info(latest), cfg, self.identity, latest)
            try:
                self.train_data = iterator.train_iterator(cfg.data, seed=cfg.seed, mesh=self.mesh, rules=self.rules)
            except FileNotFoundError as e:
                raise MissingInputError(f"data.path={cfg.data.path}: {e}") from None
        except BaseException:
            self.checkpointer.close()
            self._release_lock()
            raise
        self.validation = self._validation_set()
        self.evaluator = self._in_loop_evaluator()
        self.run_info = {"config": to_dict(cfg), "tasks": self.tasks, "data_dir": self.data_dir,
                         "data_identity": self.identity,
                         "tokenizer_path": run_tokenizer_dir(cfg.run_dir)}

    def _check_lora_inputs(self) -> None:
        """What a LoRA run reads besides the base: a PEFT adapter to continue from must match lora.*."""
        if self.cfg.lora.init_adapter:
            from agentlm_jax.lora import check_adapter_config, read_adapter_config

            where = f"lora.init_adapter={self.cfg.lora.init_adapter}"
            check_adapter_config(read_adapter_config(self.cfg.lora.init_adapter), self.cfg.lora, where)

    def load_base(self) -> dict:
        """The frozen base of a LoRA run (init_from or random), placed on its shardings; records its reference
        and content hash in the run info (saved with every checkpoint)."""
        from agentlm_jax.lora import load_base

        if self.step_fn.base is None:
            self._info("loading the frozen LoRA base (%s, %s)", self.cfg.init_from or f"random, seed {self.cfg.seed}",
                       self.cfg.lora.base_dtype)
            self.step_fn.base, self.base_info = load_base(self.cfg, self.mesh, self.rules,
                                                          show_progress=self.is_main)
            self.run_info["lora_base"] = self.base_info
        return self.step_fn.base

    def _check_tokenizer(self) -> str:
        """The dataset's tokenizer directory, loaded once now: a dataset moved without it (or a broken copy)
        fails here, in seconds, not in the export after the last step."""
        from data_pipeline.formats.tokenizer import load_tokenizer

        path = manifest_tokenizer_path(self.manifest, self.data_dir)
        if not path:
            raise MissingInputError(f"{self.data_dir}/manifest.json names no tokenizer: rebuild the dataset with "
                                    "`python -m data_pipeline.build`")
        try:
            load_tokenizer(path)
        except Exception as e:  # missing files, a corrupt model file: any reason is fatal for this dataset
            raise MissingInputError(f"the dataset's tokenizer {path} cannot be loaded ({type(e).__name__}: {e}); "
                                    f"copy the dataset with its tokenizer/ directory, or rebuild it") from None
        return path

    def _validation_set(self) -> iterator.ValidationSet | None:
        if self.cfg.logging.eval_every_steps < 0:
            return None
        try:
            return iterator.ValidationSet(self.cfg.data, max_batches=self.cfg.logging.eval_batches, mesh=self.mesh,
                                          rules=self.rules)
        except FileNotFoundError as e:
            log.warning("no validation loss: %s", e)
            return None

    def _in_loop_evaluator(self):
        """The eval.* suites' evaluator, its inputs read now (a bad eval.db_items file fails before training)."""
        ev = self.cfg.eval
        if ev.every_steps < 0:
            return None
        from agentlm_jax.evaluation.actions import read_split
        from agentlm_jax.evaluation.in_loop import InLoopEvaluator
        from agentlm_jax.evaluation.lm import data_template_of
        from data_pipeline.formats.tokenizer import load_tokenizer

        records, where = None, ""
        if "actions" in ev.suites:
            try:
                records, where = read_split(self.data_dir, ev.split)
            except MissingInputError as e:
                log.warning("eval.suites has actions but it cannot run: %s", e)
        return InLoopEvaluator(ev, load_tokenizer(self.tokenizer_dir), records, where=where,
                               data_template=data_template_of(self.manifest, f"{self.data_dir}/manifest.json"))

    # ------------------------------------------------------------------------------------------ the state
    def initial_state(self) -> TrainState:
        """Parameters from `init_from` (a Hugging Face Llama dir) or random, and a fresh optimizer state. With
        LoRA: fresh adapters (A random, B = 0) or those of `lora.init_adapter`, over the frozen base."""
        cfg = self.cfg
        if self.lora is not None:
            from agentlm_jax.model.lora import init_adapters

            self.load_base()
            if cfg.lora.init_adapter:
                from agentlm_jax.lora import import_peft

                self._info("adapters from the PEFT adapter %s", cfg.lora.init_adapter)
                params = import_peft(cfg.lora.init_adapter, cfg.model, cfg.lora, mesh=self.mesh, rules=self.rules)
            else:
                params = init_adapters(cfg.model, cfg.lora, seed=cfg.seed, mesh=self.mesh, rules=self.rules)
        elif cfg.init_from:
            from agentlm_jax.hf import CONFIG_NAME, ArchitectureMismatchError, import_hf

            fs, root = fsspec.core.url_to_fs(cfg.init_from)
            if not fs.exists(posixpath.join(root, CONFIG_NAME)):
                raise MissingInputError(
                    f"init_from={cfg.init_from}: no {CONFIG_NAME} there. Point it at a Hugging Face Llama "
                    f"directory, e.g. `hf download meta-llama/Llama-2-7b-chat-hf --local-dir DIR`, or set "
                    f"init_from=null for random weights")

            try:
                _, params = import_hf(cfg.init_from, base=cfg.model, mesh=self.mesh, rules=self.rules,
                                      show_progress=self.is_main)
            except ArchitectureMismatchError as e:
                raise ConfigError(f"init_from={cfg.init_from}: {e}") from None
        else:
            params = nnx.state(init_model(cfg.model, seed=cfg.seed, mesh=self.mesh, rules=self.rules), nnx.Param)
        init = jax.jit(lambda p: init_train_state(p, self.optimizer), out_shardings=self.shardings,
                       donate_argnums=0)
        return init(params.to_pure_dict())

    def _refuse_existing_run(self, latest: int | None) -> None:
        if latest is not None and not self.cfg.checkpoint.resume:
            raise ExistingRunError(f"{self.cfg.checkpoint_dir} already has checkpoints (latest step {latest}); "
                                   "set checkpoint.resume=true to continue that run, or choose another run_dir")

    def restore_or_init(self) -> TrainState:
        latest = self.checkpointer.latest_step()
        self._refuse_existing_run(latest)  # as in __init__, for callers of this alone
        if latest is None:
            self._info("starting from %s", self.cfg.init_from or f"random weights (seed {self.cfg.seed})")
            return self.initial_state()
        abstract = abstract_train_state(self.shardings, self.cfg.model, self.optimizer, self.lora)
        try:  # verifies the files; a damaged step is logged (naming its files) and the previous one tried
            restored = self.checkpointer.restore_latest(abstract, self.train_data)
        except ValueError as e:
            if "input iterator" not in str(e):
                raise
            raise ConfigError(f"cannot resume {self.cfg.run_dir}: {e}") from None
        if self.lora is not None:  # the adapters only make sense over the base they were trained on
            from agentlm_jax.lora import check_base

            self.load_base()
            check_base(self.checkpointer.run_info(restored.step).get("lora_base"), self.base_info,
                       f"cannot resume {self.cfg.run_dir}")
        self._info("resumed from the checkpoint of step %d in %s", restored.step, self.cfg.checkpoint_dir)
        return restored.state

    def save(self, state: TrainState, step: int) -> None:
        if not bool(distributed.to_host(_all_finite(state))):
            raise TrainingDivergedError(
                f"step {step}: the updated parameters or optimizer state hold NaN/Inf (the loss of the step was "
                f"still finite), so they were not saved. Lower optimizer.learning_rate or use "
                f"model.param_dtype=float32, then rerun to resume from the last good checkpoint")
        self.checkpointer.save(step, state, self.train_data, self.run_info)

    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, params: dict) -> dict[str, float]:
        """Token-level mean validation loss: overall, agent / general, and per task."""
        totals = None
        for batch in self.validation:
            sums = self.step_fn.eval_sums(params, host_batch_to_global(batch, self.mesh, self.rules))
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        if totals is None:
            return {}
        t = distributed.tree_to_host(totals)
        out = {"val/loss": float(mean(t["loss_sum"], t["count"])), "val/loss_tokens": float(t["count"])}
        for group in ("agent", "general"):
            if t[f"{group}_count"] > 0:
                out[f"val/{group}_loss"] = float(t[f"{group}_loss_sum"] / t[f"{group}_count"])
        for i, task in enumerate(self.tasks):
            if t["task_count"][i] > 0:
                out[f"val/loss/{task}"] = float(t["task_loss_sum"][i] / t["task_count"][i])
        return out

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.logging.eval_every_steps
        return self.validation is not None and every > 0 and step % every == 0

    def _agent_eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return self.evaluator is not None and every > 0 and step % every == 0

    def eval_model(self, params: dict):
        """The model as trained so far, for generation: the train state's parameters (with LoRA: the frozen
        base and the adapters) in the step's graph, sharded as they are."""
        if self.lora is not None:
            from agentlm_jax.model.lora import merge_trees

            params = merge_trees(self.step_fn.base, params)
        return nnx.merge(self.step_fn.graphdef, params)

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> RunResult:
        cfg = self.cfg
        worker_log = WorkerLog(cfg.run_dir, jax.process_index())
        logging.getLogger().addHandler(worker_log)
        try:
            return self._run(worker_log)
        finally:
            logging.getLogger().removeHandler(worker_log)
            worker_log.close()
            self._release_lock()

    def _run(self, worker_log: WorkerLog) -> RunResult:
        cfg = self.cfg
        state = self.restore_or_init()
        self._write_config()  # after a successful restore: a refused resume leaves the run dir as it was
        if self.is_main:
            copy_tokenizer(self.tokenizer_dir, cfg.run_dir)
        start = int(distributed.to_host(state.step))
        result = RunResult(status="finished", step=start, run_dir=cfg.run_dir)
        writer = MetricsWriter(cfg.run_dir, enabled=self.is_main, tensorboard=cfg.logging.tensorboard,
                               resume_step=start)
        preemption = distributed.PreemptionWatch()
        tokens_per_step = cfg.data.global_batch * cfg.data.max_seq_len
        peak, peak_source = peak_flops(cfg.logging.peak_flops_per_device)
        throughput = Throughput(tokens_per_step, flops_per_token(cfg.model, cfg.data.max_seq_len), peak)
        if self.lora is not None:
            from agentlm_jax.model.lora import count_adapter_params

            self._info("LoRA: %.2fM trainable adapter parameters (rank %d, alpha %g, targets %s) over a frozen "
                       "%s base", count_adapter_params(cfg.model, cfg.lora) / 1e6, cfg.lora.rank, cfg.lora.alpha,
                       ",".join(cfg.lora.targets), cfg.lora.base_dtype)
        self._info("model: %.1fM parameters; mesh %s; loss %s; %d micro-batch(es) of %d x %d; peak %.3g FLOP/s (%s)",
                   count_params(cfg.model) / 1e6, dict(self.mesh.shape), self.step_fn.loss_impl, cfg.data.micro_batches,
                   cfg.micro_batch, cfg.data.max_seq_len, peak, peak_source)
        bar = Progress(total=cfg.steps, initial=start, desc="train", unit="step",
                       enabled=self.is_main and cfg.logging.progress_bar)
        sync_due = Every(cfg.logging.sync_every_s)
        save_due = Every(60 * cfg.checkpoint.every_minutes if cfg.checkpoint.every_minutes else None)
        pending: tuple[int, dict] | None = None  # (step, device metrics) dispatched but not yet checked
        if self.evaluator is not None and start < cfg.steps:  # while the first step compiles
            self.evaluator.compile_in_background(self.eval_model(state.params))
        try:
            with bar.logging_redirected():
                for step in range(start + 1, cfg.steps + 1):
                    batch = host_batch_to_global(next(self.train_data), self.mesh, self.rules)
                    state, metrics = self.step_fn(state, batch)  # dispatched; runs while we look at step - 1
                    if pending is not None:
                        self._check_and_log(*pending, writer, throughput, bar, result)
                    pending = (step, metrics)
                    throughput.step()
                    stop = preemption.stop_requested(step)
                    save_now = stop or step == cfg.steps or step % cfg.checkpoint.every_steps == 0 \
                        or self._timed_save_due(step, save_due)
                    eval_now = self._eval_due(step)
                    agent_eval_now = self._agent_eval_due(step)
                    if step == start + 1 or save_now or eval_now or agent_eval_now:  # these need this step's metrics now
                        self._check_and_log(*pending, writer, throughput, bar, result)
                        pending = None
                    with throughput.paused():  # the next step's tokens/s and MFU count training only
                        if save_now:
                            self.save(state, step)
                            save_due.reset()
                        if save_now or sync_due.due():
                            writer.sync()
                            worker_log.sync()
                        if eval_now:
                            self._log_validation(step, state, writer, result)
                        if agent_eval_now:
                            self._log_agent_eval(step, state, writer, result)
                    result.step = step
                    if stop:
                        result.status = "preempted"
                        log.warning("stopped at step %d on SIGTERM; checkpoint saved in %s. Rerun the same "
                                    "command to resume.", step, cfg.checkpoint_dir)
                        break
                else:
                    if start >= cfg.steps:
                        self._info("the checkpoint is already at step %d of %d: nothing to train", start, cfg.steps)
                    if self.validation is not None and cfg.logging.eval_every_steps >= 0 \
                            and not self._eval_due(cfg.steps):
                        self._log_validation(cfg.steps, state, writer, result)
                    if self.evaluator is not None and not self._agent_eval_due(cfg.steps):
                        self._log_agent_eval(cfg.steps, state, writer, result)
            bar.close()  # its last line before the export's
            self.checkpointer.wait_until_finished()
            if result.status == "finished" and cfg.export.enabled:
                result.export_path = self.export(state)
        except TrainingDivergedError:
            self.checkpointer.wait_until_finished()  # earlier (good) saves complete; the bad state is never saved
            latest = self.checkpointer.latest_step()
            if latest is None:
                log.error("no good checkpoint: none was saved before the run diverged (a rerun starts afresh)")
            else:
                log.error("the last good checkpoint is step %d in %s", latest, cfg.checkpoint_dir)
            raise
        finally:
            bar.close()
            if self.evaluator is not None:
                self.evaluator.close()  # a compile ahead still running
            preemption.close()
            writer.close()
            self.checkpointer.close()
            self.train_data.close()
        return result

    def _timed_save_due(self, step: int, save_due: Every) -> bool:
        """checkpoint.every_minutes has passed. On several hosts every host must save at the same step, so
        process 0's clock decides, broadcast at logging steps only (a small collective)."""
        if jax.process_count() == 1:
            return save_due.due()
        if step % self.cfg.logging.every_steps:
            return False
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(jnp.int32(save_due.due())))

    def _check_and_log(self, step: int, metrics: dict, writer: MetricsWriter, throughput: Throughput,
                       bar: Progress, result: RunResult) -> None:
        """Fetch one step's metrics (waits for that step), stop on NaN/Inf, log at the logging interval."""
        values = distributed.host_metrics(metrics)
        loss = values["loss"]
        if not _finite(loss) or not _finite(values["grad_norm"]):
            raise TrainingDivergedError(
                f"step {step}: loss {loss}, gradient norm {values['grad_norm']}: the training diverged. Nothing "
                f"from this step was saved. Lower optimizer.learning_rate or check the data, then rerun to resume "
                f"from the last checkpoint in {self.cfg.checkpoint_dir}")
        first = result.first_loss is None
        if first:  # the first step of this invocation includes compilation: report it, not its throughput
            result.first_loss = loss
            values["first_step_s"] = throughput.rate().get("step_s", 0.0)
            self._info("first step: %.1f s (compilation included)", values["first_step_s"])
        result.last_loss = loss
        _drop_empty_group_losses(values)
        bar.update(step - bar.n)
        if first or step % self.cfg.logging.every_steps == 0 or step == self.cfg.steps:
            if not first:
                values.update(throughput.rate())
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['learning_rate']:.2e}",
                            tok_s=f"{values.get('tokens_per_s', 0):.0f}")
            writer.write(step, values)
            speed = f", {values['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in values else ""
            speed += f", MFU {values['mfu']:.1%}" if "mfu" in values else ""
            self._info("step %d: loss %.4f (agent %s, general %s), lr %.3g, grad norm %.3g%s", step, loss,
                       _fmt(values.get("agent_loss")), _fmt(values.get("general_loss")), values["learning_rate"],
                       values["grad_norm"], speed)

    def _log_validation(self, step: int, state: TrainState, writer: MetricsWriter, result: RunResult) -> None:
        values = self.evaluate(state.params)
        if not values:
            return
        result.validation = values
        writer.write(step, values)
        tasks = ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.3f}" for k, v in values.items() if k.startswith("val/loss/"))
        self._info("step %d: validation loss %.4f (agent %s, general %s; %s)", step, values["val/loss"],
                   _fmt(values.get("val/agent_loss")), _fmt(values.get("val/general_loss")), tasks)

    def _log_agent_eval(self, step: int, state: TrainState, writer: MetricsWriter, result: RunResult) -> None:
        """The eval.* suites on the model as trained so far. A failure is logged and counted, never fatal: the
        next due step tries again (every host runs the suites: their generation is collective)."""
        self._info("step %d: in-loop evaluation (%s)", step, ", ".join(self.cfg.eval.suites))
        try:
            values = self.evaluator(self.eval_model(state.params), show_progress=False)
        except Exception as e:  # noqa: BLE001 - an evaluation bug must not cost the training run
            result.eval_failures += 1
            log.warning("step %d: the in-loop evaluation failed (%s: %s); training goes on and the next one "
                        "(eval.every_steps=%d) tries again", step, type(e).__name__, e, self.cfg.eval.every_steps,
                        exc_info=True)
            writer.write(step, {"eval/failures": float(result.eval_failures)})
            return
        result.agent_eval = values
        writer.write(step, values)
        from agentlm_jax.evaluation.suites import summary_line

        compiled = (f" (its programs compiled ahead in {values['eval/compile_seconds']:.1f} s, beside training)"
                    if "eval/compile_seconds" in values else "")
        self._info("step %d: in-loop evaluation in %.1f s%s: %s", step, values["eval/seconds"], compiled,
                   summary_line(values))

    def _info(self, msg: str, *args: Any) -> None:
        """An info line from process 0 only (every host runs the same loop); warnings and errors stay on all."""
        if self.is_main:
            log.info(msg, *args)

    # -------------------------------------------------------------------------------------- run dir files
    def _write_config(self) -> None:
        text = to_yaml(self.cfg)
        if not self.is_main:
            return
        print(f"# resolved config (saved to {self.cfg.run_dir}/config.yaml)\n{text}", flush=True)
        write_config(self.cfg.run_dir, text)

    def export(self, state: TrainState) -> str:
        from agentlm_jax.hf import export_hf

        path = self.cfg.export_path
        tokenizer = self.run_info["tokenizer_path"]
        params = state.params
        if self.lora is not None:
            from agentlm_jax.lora import export_peft, merged_export_params

            adapter_dir = self.cfg.adapter_path
            self._info("writing the PEFT adapter to %s", adapter_dir)
            export_peft(state.params, self.cfg.model, self.cfg.lora, adapter_dir,
                        base_model_name_or_path=self.cfg.init_from, overwrite=True)
            params = merged_export_params(self.step_fn.base, state.params, self.cfg.model, self.cfg.lora,
                                          self.cfg.export.dtype)
            self._info("exporting the merged model (base + alpha/r A·B)")
        self._info("exporting the Hugging Face checkpoint to %s (tokenizer: %s)", path, tokenizer)
        export_hf(params, self.cfg.model, path, dtype=self.cfg.export.dtype,
                  max_shard_size=self.cfg.export.max_shard_size, tokenizer_path=tokenizer, overwrite=True,
                  show_progress=self.is_main and self.cfg.logging.progress_bar)
        return path


def train(cfg: TrainConfig) -> RunResult:
    return Trainer(cfg).run()

