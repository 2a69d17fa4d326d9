"""Evaluation the trainer runs between steps (`eval.*` of the config): the suites of `evaluate` on the model
being trained, greedy through the stack's KV-cache generation, returning flat metrics for metrics.jsonl,
TensorBoard and the progress log.

    evaluator = InLoopEvaluator(cfg.eval, tokenizer, records, data_template=data_template_of(manifest))
    metrics = evaluator(model)
    # {"eval/actions/os/accuracy": 0.25, ..., "eval/actions/accuracy": 0.31, "eval/actions/seconds": 12.3}

`model` is a `Llama` with the parameters as trained so far (the trainer merges it from its train state:
`nnx.merge(step_fn.graphdef, params)`). The evaluator keeps one `LM` (one `Generator`) for the whole run and
swaps the parameters in at each call, so the decode programs compile once. The trainer has the `actions`
programs compiled before the first evaluation is due, in a thread beside its first steps
(`compile_in_background`): with the default suites the first evaluation then costs what the others do, and
the compile's time is reported on its own (`eval/compile_seconds`, not part of `eval/seconds`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Sequence

from agentlm_jax.config.schema import EvalConfig
from agentlm_jax.evaluation.lm import LM
from agentlm_jax.evaluation.suites import SuiteInputs, flat_metrics, run_suites

log = logging.getLogger(__name__)


class InLoopEvaluator:
    def __init__(self, cfg: EvalConfig, tokenizer, records: Sequence | None = None, *,
                 data_template: dict | None = None, where: str = ""):
        """Reads the suites' inputs now (a bad file fails before training starts): `records` for actions (the
        split's records), the dbbench / general items from cfg's paths or the package's samples."""
        from agentlm_jax.evaluation import dbbench, general

        self.cfg, self.tokenizer, self.data_template = cfg, tokenizer, data_template
        self.inputs = SuiteInputs(records=records, where=where)
        if "dbbench" in cfg.suites:
            self.inputs.db_items, self.inputs.db_source = dbbench.load_items(cfg.db_items, limit=cfg.max_items)
        if "general" in cfg.suites:
            self.inputs.mmlu = general.load_mmlu(cfg.mmlu, limit=cfg.max_items)
            self.inputs.gsm8k = general.load_gsm8k(cfg.gsm8k, limit=cfg.max_items)
        self.lm: LM | None = None
        self._compiling: threading.Thread | None = None
        self._compile_seconds: float | None = None  # of the background compile, reported once

    def compile_in_background(self, model) -> threading.Thread | None:
        """Start compiling, in a thread, the programs the `actions` suite will run (its turns are known before
        any model answers; dbbench's and general's programs still compile at the first evaluation), with the
        parameters' shapes and shardings only (training may donate the arrays meanwhile). The thread runs at the
        lowest CPU priority (Linux), so it takes the cycles training leaves idle. The next call waits for it.
        A failure is logged: that evaluation then compiles as it would have."""
        if "actions" not in self.cfg.suites or not self.inputs.records:
            return None
        try:
            import jax
            from flax import nnx

            from agentlm_jax.evaluation import actions

            lm = self._lm(model)
            state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(  # as jit keys them: committed arrays' shardings
                a.shape, a.dtype, sharding=a.sharding if a.committed else None, weak_type=a.weak_type),
                nnx.state(model))
            req = actions.requests(self.inputs.records, lm.decode, max_items=None,
                                   max_new_tokens=self.cfg.max_new_tokens, max_length=lm.max_length,
                                   where=self.inputs.where, max_turns=self.cfg.max_items)
        except Exception as e:  # noqa: BLE001 - the evaluation itself will report what is wrong
            log.warning("cannot compile the in-loop evaluation ahead (%s: %s); the first evaluation compiles it",
                        type(e).__name__, e, exc_info=True)
            return None

        def compile_programs():
            if sys.platform == "linux":  # this thread only (a Linux thread is a task with its own nice value)
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
                except OSError:
                    pass
            start = time.perf_counter()
            try:
                if req.flat:
                    lm.compile(req.prompts, max_new_tokens=req.budgets, state=state)
                self._compile_seconds = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - the evaluation will compile them itself
                log.warning("compiling the in-loop evaluation ahead failed (%s: %s); the first evaluation compiles "
                            "it instead", type(e).__name__, e, exc_info=True)

        self._compiling = threading.Thread(target=compile_programs, name="eval-compile", daemon=True)
        self._compiling.start()
        return self._compiling

    def close(self) -> None:
        """Wait for a compile still running in the background (a run that ends before its first evaluation)."""
        if self._compiling is not None:
            self._compiling.join()
            self._compiling = None

    def _lm(self, model) -> LM:
        """The run's LM, with `model`'s parameters: same graph, so the same compiled programs."""
        from flax import nnx

        graphdef, state = nnx.split(model)
        if self.lm is None or self.lm.generator.graphdef != graphdef:
            self.lm = LM(model, self.tokenizer, batch_size=self.cfg.batch_size, data_template=self.data_template,
                         one_shape=True)
        else:
            self.lm.model, self.lm.generator.state = model, state
        return self.lm

    def __call__(self, model, *, show_progress: bool = False) -> dict[str, float]:
        start = time.perf_counter()  # a wait for the background compile counts
        self.close()
        lm = self._lm(model)
        suites = [s for s in self.cfg.suites if s != "actions" or self.inputs.records]
        results, timing = run_suites(lm, suites, self.inputs, max_items=None, max_turns=self.cfg.max_items,
                                     max_new_tokens=self.cfg.max_new_tokens, gsm8k_max_new_tokens=self.cfg.max_new_tokens,
                                     show_progress=show_progress)
        out = flat_metrics(results, timing)
        out["eval/seconds"] = time.perf_counter() - start
        if self._compile_seconds is not None:
            out["eval/compile_seconds"], self._compile_seconds = self._compile_seconds, None
        return out
