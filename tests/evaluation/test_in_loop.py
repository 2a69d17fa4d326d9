"""The trainer's evaluator: flat metrics from the suites; the compiled generator is reused across calls and
always decodes with the model's current weights; eval.max_items bounds the turns per task."""

from __future__ import annotations

from flax import nnx

from agentlm_jax.config import EvalConfig
from agentlm_jax.evaluation.actions import read_split, select_turns
from agentlm_jax.evaluation.in_loop import InLoopEvaluator
from agentlm_jax.evaluation.lm import LM
from agentlm_jax.model.llama import init_model
from tests.evaluation.conftest import TINY_EVAL

TASKS = ("alfworld", "db", "kg", "mind2web", "os", "webshop")


def test_metrics_and_fresh_weights(sample_data, tokenizer):
    records, _ = read_split(sample_data, "validation")
    model = init_model(TINY_EVAL, seed=1)
    evaluator = InLoopEvaluator(EvalConfig(max_items=2, max_new_tokens=8), tokenizer, records)
    metrics = evaluator(model)
    assert {f"eval/actions/{t}/accuracy" for t in TASKS} <= metrics.keys()
    assert 0 < metrics["eval/actions/scored_turns"] <= 2 * len(TASKS)
    assert 0 <= metrics["eval/actions/accuracy"] <= 1 and metrics["eval/actions/seconds"] > 0
    lm = evaluator.lm
    prompt = [records[0].input_ids[:20].tolist()]
    before = lm.complete(prompt, max_new_tokens=8)

    nnx.update(model, nnx.state(init_model(TINY_EVAL, seed=2)))  # "a few training steps later"
    evaluator(model)
    assert evaluator.lm is lm  # the same compiled programs
    after = lm.complete(prompt, max_new_tokens=8)
    assert after == LM(model, tokenizer).complete(prompt, max_new_tokens=8)
    assert after != before

    # As the trainer calls it: a new model object merged from the train state's parameters each time.
    graphdef, _ = nnx.split(model)
    merged = nnx.merge(graphdef, nnx.state(init_model(TINY_EVAL, seed=3)))
    evaluator(merged)
    assert evaluator.lm is lm
    assert lm.complete(prompt, max_new_tokens=8) == LM(merged, tokenizer).complete(prompt, max_new_tokens=8)


def test_max_turns_bounds_turns_per_task_in_record_order(sample_data):
    records, _ = read_split(sample_data, "validation")
    all_turns, _ = select_turns(records, max_items=None)
    capped, _ = select_turns(records, max_items=None, max_turns=3)
    assert set(capped) == set(all_turns)
    for task, turns in capped.items():
        assert turns == all_turns[task][:3]
    assert any(len(v) > 3 for v in all_turns.values())  # the cap did cut something


def test_dbbench_and_general_suites_report_flat_metrics(tokenizer, tiny_model):
    evaluator = InLoopEvaluator(EvalConfig(suites=("dbbench", "general"), max_items=2, max_new_tokens=8), tokenizer)
    assert len(evaluator.inputs.db_items) == 2 and len(evaluator.inputs.mmlu[0]) == 2
    metrics = evaluator(tiny_model)
    assert metrics["eval/dbbench/episodes"] == 2 and 0 <= metrics["eval/dbbench/success"] <= 1
    assert 0 <= metrics["eval/general/mmlu/accuracy"] <= 1 and 0 <= metrics["eval/general/gsm8k/accuracy"] <= 1
    assert not any(k.startswith("eval/actions") for k in metrics)  # no records: actions is not run
