"""Evaluation the trainer can run between steps: the `actions` suite on validation records, on the model
being trained, returning flat metrics for metrics.jsonl / TensorBoard.

    metrics = evaluate_in_loop(model, tokenizer, records, max_items=8)
    # {"eval/actions/os/accuracy": 0.25, ..., "eval/actions/accuracy": 0.31, "eval/actions/seconds": 12.3}

`model` is the trained `Llama` (nnx; its parameters as they are, sharded or not), `tokenizer` the dataset's
(data_pipeline.formats.tokenizer.load_tokenizer(manifest tokenizer path)), `records` validation
records.Record objects (agentlm_jax.data.dataset.TFRecordSource over split_files(data.path, "validation")).
Pass the same `lm_cache` dict on every call so the compiled decode programs are reused (a new `Generator`
per call would recompile); the parameters are read from `model` at each call, so the trainer may pass a
model freshly merged from its train state: `nnx.merge(step_fn.graphdef, state.params)`.
"""

from __future__ import annotations

import time
from typing import Sequence

from agentlm_jax.evaluation.actions import evaluate_actions
from agentlm_jax.evaluation.lm import LM


def evaluate_in_loop(model, tokenizer, records: Sequence, *, max_items: int = 8, max_new_tokens: int = 64,
                     batch_size: int = 8, lm_cache: dict | None = None, show_progress: bool = False) -> dict:
    start = time.perf_counter()
    from flax import nnx

    lm = None if lm_cache is None else lm_cache.get("lm")
    graphdef, state = nnx.split(model)
    if lm is None or lm.generator.graphdef != graphdef:
        lm = LM(model, tokenizer, batch_size=batch_size)
        if lm_cache is not None:
            lm_cache["lm"] = lm
    else:  # the weights as trained so far (a new model merged from the train state is fine): same programs
        lm.model, lm.generator.state = model, state
    result = evaluate_actions(records, lambda p, b, on_batch=None: lm.complete(p, max_new_tokens=b, on_batch=on_batch),
                              lm.decode, max_items=max_items, max_new_tokens=max_new_tokens,
                              max_length=lm.max_length, show_progress=show_progress)
    out = {}
    for task, v in result["tasks"].items():
        if v["accuracy"] is not None:
            out[f"eval/actions/{task}/accuracy"] = v["accuracy"]
            out[f"eval/actions/{task}/unparsed_rate"] = v["unparsed_rate"]
    if result["overall"]["accuracy"] is not None:
        out["eval/actions/accuracy"] = result["overall"]["accuracy"]
        out["eval/actions/macro_accuracy"] = result["overall"]["macro_accuracy"]
    out["eval/actions/scored_turns"] = result["overall"]["scored_turns"]
    out["eval/actions/seconds"] = time.perf_counter() - start
    return out
