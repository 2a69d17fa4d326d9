"""Evaluation the trainer runs between steps (`eval.*` of the config): the suites of `evaluate` on the model
being trained, greedy through the stack's KV-cache generation, returning flat metrics for metrics.jsonl,
TensorBoard and the progress log.

    evaluator = InLoopEvaluator(cfg.eval, tokenizer, records, data_template=data_template_of(manifest))
    metrics = evaluator(model)
    # {"eval/actions/os/accuracy": 0.25, ..., "eval/actions/accuracy": 0.31, "eval/actions/seconds": 12.3}

`model` is a `Llama` with the parameters as trained so far (the trainer merges it from its train state:
`nnx.merge(step_fn.graphdef, params)`). The evaluator keeps one `LM` (one `Generator`) for the whole run and
swaps the parameters in at each call, so the decode programs compile once, at the first evaluation.
"""

from __future__ import annotations

import time
from typing import Sequence

from agentlm_jax.config.schema import EvalConfig
from agentlm_jax.evaluation.lm import LM
from agentlm_jax.evaluation.suites import SuiteInputs, flat_metrics, run_suites


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

    def __call__(self, model, *, show_progress: bool = False) -> dict[str, float]:
        from flax import nnx

        start = time.perf_counter()
        graphdef, state = nnx.split(model)
        if self.lm is None or self.lm.generator.graphdef != graphdef:
            self.lm = LM(model, self.tokenizer, batch_size=self.cfg.batch_size, data_template=self.data_template,
                         one_shape=True)
        else:  # the weights as trained so far: same graph, so the same compiled programs
            self.lm.model, self.lm.generator.state = model, state
        suites = [s for s in self.cfg.suites if s != "actions" or self.inputs.records]
        results, timing = run_suites(self.lm, suites, self.inputs, max_items=None, max_turns=self.cfg.max_items,
                                     max_new_tokens=self.cfg.max_new_tokens, gsm8k_max_new_tokens=self.cfg.max_new_tokens,
                                     show_progress=show_progress)
        out = flat_metrics(results, timing)
        out["eval/seconds"] = time.perf_counter() - start
        return out
