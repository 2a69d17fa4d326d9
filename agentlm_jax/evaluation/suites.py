"""Run the evaluation suites on one `LM`: the code `python -m agentlm_jax.evaluate` and the trainer's in-loop
evaluation share, so both score the same way.

    inputs = SuiteInputs(records=records, db_items=items, mmlu=mmlu, gsm8k=gsm8k)
    suites, timing = run_suites(lm, ["actions", "dbbench"], inputs, max_items=50, max_new_tokens=128)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence


@dataclasses.dataclass
class SuiteInputs:
    records: Sequence | None = None  # actions: records.Record objects of a pipeline split
    where: str = ""  # actions: a prefix naming the split in error messages
    db_items: Sequence | None = None  # dbbench: dbbench.Item objects
    db_source: str | None = None
    db_backend: object | None = None  # dbbench: a dbbench.open_backend(...) backend; None: SQLite in memory
    mmlu: tuple[list[dict], str] | None = None  # general: (items, source) of general.load_mmlu
    gsm8k: tuple[list[dict], str] | None = None  # general: (items, source) of general.load_gsm8k


def run_suites(lm, suites: Sequence[str], inputs: SuiteInputs, *, max_items: int | None, max_new_tokens: int,
               max_rounds: int = 5, gsm8k_max_new_tokens: int = 256, max_turns: int | None = None,
               show_progress: bool = False) -> tuple[dict, dict]:
    """({suite: result}, {suite: {"seconds", count, rate}}) for the named suites (actions, dbbench, general)."""
    from agentlm_jax.evaluation import actions, dbbench, general

    results, timing = {}, {}
    if "actions" in suites:
        start = time.perf_counter()
        results["actions"] = actions.evaluate_actions(
            inputs.records, lambda p, b, on_batch=None: lm.complete(p, max_new_tokens=b, on_batch=on_batch),
            lm.decode, max_items=max_items, max_new_tokens=max_new_tokens, max_length=lm.max_length,
            where=inputs.where, show_progress=show_progress, max_turns=max_turns)
        timing["actions"] = rate(time.perf_counter() - start, results["actions"]["overall"]["scored_turns"], "turns")
    if "dbbench" in suites:
        start = time.perf_counter()
        results["dbbench"] = dbbench.evaluate_dbbench(
            inputs.db_items, dbbench.model_respond(lm, max_new_tokens=max_new_tokens), max_rounds=max_rounds,
            show_progress=show_progress, backend=inputs.db_backend)
        timing["dbbench"] = rate(time.perf_counter() - start, len(inputs.db_items), "episodes")
    if "general" in suites:
        start = time.perf_counter()
        mmlu, gsm8k = inputs.mmlu, inputs.gsm8k
        results["general"] = {
            "mmlu": {**general.evaluate_mmlu(lm, mmlu[0]), "source": mmlu[1]},
            "gsm8k": {**general.evaluate_gsm8k(lm, gsm8k[0], max_new_tokens=gsm8k_max_new_tokens),
                      "source": gsm8k[1]}}
        timing["general"] = rate(time.perf_counter() - start, len(mmlu[0]) + len(gsm8k[0]), "items")
    return results, timing


def rate(seconds: float, count: int, unit: str) -> dict:
    return {"seconds": round(seconds, 2), unit: count, f"{unit}_per_s": round(count / seconds, 3) if seconds else None}


def flat_metrics(results: dict, timing: dict) -> dict[str, float]:
    """The numbers of `run_suites`' results as flat keys for metrics.jsonl / TensorBoard:
    eval/actions/<task>/accuracy, eval/actions/accuracy, eval/dbbench/success, eval/general/mmlu/accuracy, ..."""
    out: dict[str, float] = {}

    def put(key, value):
        if value is not None:
            out[key] = float(value)

    if "actions" in results:
        r = results["actions"]
        for task, v in r["tasks"].items():
            put(f"eval/actions/{task}/accuracy", v["accuracy"])
            put(f"eval/actions/{task}/unparsed_rate", v["unparsed_rate"])
        put("eval/actions/accuracy", r["overall"]["accuracy"])
        put("eval/actions/macro_accuracy", r["overall"]["macro_accuracy"])
        put("eval/actions/scored_turns", r["overall"]["scored_turns"])
    if "dbbench" in results:
        r = results["dbbench"]
        put("eval/dbbench/success", r["overall_cat_accuracy"])  # the paper's DB number: mean of the 3 groups
        for group in ("SELECT", "INSERT", "UPDATE"):
            put(f"eval/dbbench/{group.lower()}_accuracy", r[f"{group}_accuracy"])
        put("eval/dbbench/invalid_format_rate", r["invalid_format_rate"])
        put("eval/dbbench/episodes", r["episodes"])
    if "general" in results:
        for bench in ("mmlu", "gsm8k"):
            put(f"eval/general/{bench}/accuracy", results["general"][bench]["accuracy"])
    for suite, t in timing.items():
        put(f"eval/{suite}/seconds", t["seconds"])
    return out


def summary_line(flat: dict[str, float]) -> str:
    """One log line of `flat_metrics`' numbers: the suites' headline numbers, then the accuracy per task."""
    parts = [f"{name} {flat[key]:.3f}" for key, name in (
        ("eval/actions/accuracy", "actions"), ("eval/dbbench/success", "dbbench"),
        ("eval/general/mmlu/accuracy", "mmlu"), ("eval/general/gsm8k/accuracy", "gsm8k")) if key in flat]
    parts += [f"{k.split('/')[2]} {v:.3f}" for k, v in flat.items()
              if k.startswith("eval/actions/") and k.endswith("/accuracy") and k.count("/") == 3]
    return "; ".join(parts) or "nothing scored"
