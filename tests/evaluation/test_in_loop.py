"""The trainer's entry point: flat metrics from the actions suite; with a cache, the compiled generator is
reused and always decodes with the model's current weights."""

from __future__ import annotations

from flax import nnx

from agentlm_jax.evaluation.actions import read_split
from agentlm_jax.evaluation.in_loop import evaluate_in_loop
from agentlm_jax.evaluation.lm import LM
from agentlm_jax.model.llama import init_model
from tests.evaluation.conftest import TINY_EVAL


def test_metrics_and_fresh_weights(sample_data, tokenizer):
    records, _ = read_split(sample_data, "validation")
    model = init_model(TINY_EVAL, seed=1)
    cache = {}
    metrics = evaluate_in_loop(model, tokenizer, records, max_items=1, max_new_tokens=8, lm_cache=cache)
    tasks = ("alfworld", "db", "kg", "mind2web", "os", "webshop")
    assert {f"eval/actions/{t}/accuracy" for t in tasks} <= metrics.keys()
    assert metrics["eval/actions/scored_turns"] > 0 and 0 <= metrics["eval/actions/accuracy"] <= 1
    lm = cache["lm"]
    prompt = [records[0].input_ids[:20].tolist()]
    before = lm.complete(prompt, max_new_tokens=8)

    nnx.update(model, nnx.state(init_model(TINY_EVAL, seed=2)))  # "a few training steps later"
    evaluate_in_loop(model, tokenizer, records, max_items=1, max_new_tokens=8, lm_cache=cache)
    assert cache["lm"] is lm  # the same compiled programs
    after = lm.complete(prompt, max_new_tokens=8)
    assert after == LM(model, tokenizer).complete(prompt, max_new_tokens=8)
    assert after != before

    # As the trainer would call it: a new model object merged from the train state's parameters each time.
    graphdef, _ = nnx.split(model)
    merged = nnx.merge(graphdef, nnx.state(init_model(TINY_EVAL, seed=3)))
    evaluate_in_loop(merged, tokenizer, records, max_items=1, max_new_tokens=8, lm_cache=cache)
    assert cache["lm"] is lm
    assert lm.complete(prompt, max_new_tokens=8) == LM(merged, tokenizer).complete(prompt, max_new_tokens=8)
