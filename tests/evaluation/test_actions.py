"""Suite `actions`: turns are the runs of loss_mask == 1; batched KV-cache greedy continuations equal a
brute-force argmax loop without cache; an oracle scores 100 %, a wrong agent 0 %, garbage is unparsed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agentlm_jax.errors import ConfigError
from agentlm_jax.evaluation import actions
from agentlm_jax.evaluation.actions import evaluate_actions, loss_runs, read_split, record_turns
from data_pipeline.formats.records import Record

MAX_NEW = 16


@pytest.fixture(scope="module")
def records(sample_data):
    recs, _ = read_split(sample_data, "validation")
    return recs


def test_loss_runs():
    assert loss_runs([0, 1, 1, 0, 0, 1, 0, 1]) == [(1, 3), (5, 6), (7, 8)]
    assert loss_runs([0, 0]) == [] and loss_runs([]) == []


def test_turns_are_the_loss_runs_with_everything_before_as_prompt(records):
    record = next(r for r in records if r.task == "os")
    turns = record_turns(record)
    runs = loss_runs(record.loss_mask)
    assert len(turns) == len(runs) >= 2
    for t, (a, b) in zip(turns, runs):
        assert t.prompt == record.input_ids[:a].tolist() and t.gold == record.input_ids[a:b].tolist()


def test_bad_records_are_named():
    bad = Record(np.arange(1, 5, dtype=np.int32), np.array([0, 2, 1, 0], np.int32), "agent", "os", "os_7")
    with pytest.raises(ConfigError, match=r"data/x \(validation\): record 'os_7': loss_mask holds \[2\]"):
        record_turns(bad, where="data/x (validation): ")
    first = Record(np.arange(1, 5, dtype=np.int32), np.array([1, 1, 0, 0], np.int32), "agent", "os", "os_8")
    with pytest.raises(ConfigError, match="record 'os_8': its first token carries loss"):
        record_turns(first)


_forward = nnx.jit(lambda model, t, p, s: model(t, p, s))


def _brute_force(model, prompt, budget, stop_ids, length):
    """Greedy without a cache: a full forward pass over the whole sequence for every new token (right-padded
    to a fixed length, so it compiles once; padding comes after the last real token and causality hides it)."""
    ids, out = list(prompt), []
    for _ in range(budget):
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(ids)] = ids
        positions = np.arange(length, dtype=np.int32)[None]
        segments = (np.arange(length) < len(ids)).astype(np.int32)[None]
        logits = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
        token = int(np.argmax(logits[0, len(ids) - 1]))
        if token in stop_ids:
            break
        out.append(token)
        ids.append(token)
    return out


def test_batched_cached_generation_equals_brute_force(records, tiny_lm, tiny_model):
    calls = {}

    def cached(prompts, budgets, on_batch=None):
        out = tiny_lm.complete(prompts, max_new_tokens=budgets, on_batch=on_batch)
        calls["cached"] = (list(map(list, prompts)), list(budgets), out)
        return out

    result = evaluate_actions(records, cached, tiny_lm.decode, max_items=1, max_new_tokens=MAX_NEW, extra_tokens=0,
                              show_progress=False)
    prompts, budgets, cached_out = calls["cached"]
    assert len(prompts) >= 6 and len({len(p) for p in prompts}) > 1  # several batches of mixed lengths
    stop_ids = set(tiny_lm.generator.stop_ids.tolist())
    length = max(len(p) for p in prompts) + MAX_NEW
    brute = [_brute_force(tiny_model, p, b, stop_ids, length) for p, b in zip(prompts, budgets)]
    assert cached_out == brute
    assert any(len(o) > 1 for o in brute)
    reference = evaluate_actions(records, lambda p, b, on_batch=None: [_brute_force(tiny_model, q, c, stop_ids, length)
                                                                     for q, c in zip(p, b)],
                                 tiny_lm.decode, max_items=1, max_new_tokens=MAX_NEW, extra_tokens=0,
                                 show_progress=False)
    assert reference["tasks"] == result["tasks"]
    assert set(result["tasks"]) == {"alfworld", "db", "kg", "mind2web", "os", "webshop"}


def test_an_oracle_scores_everything_and_a_wrong_agent_nothing(records, tokenizer):
    gold = {tuple(t.prompt): t.gold for r in records for t in record_turns(r)}
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
    oracle = evaluate_actions(records, lambda p, b, on_batch=None: [gold[tuple(q)] for q in p], decode,
                              max_items=None, show_progress=False)
    for task, v in oracle["tasks"].items():
        assert v["accuracy"] == 1.0 and v["unparsed_rate"] == 0.0 and v["scored_turns"] > 0, task
    # The acknowledgements ("OK", "Ok.") carry loss but no action: counted, not scored.
    assert oracle["tasks"]["webshop"]["turns"] > oracle["tasks"]["webshop"]["scored_turns"]

    # Wrong: every turn answered with the gold of another turn of the same task whose action differs.
    by_task = {}
    for r in records:
        for t in record_turns(r):
            by_task.setdefault(r.task, []).append(t)
    extractors = {task: actions.extractor_for(task) for task in by_task}

    def wrong(prompts, budgets, on_batch=None):
        out = []
        for q in prompts:
            turn = next(t for ts in by_task.values() for t in ts if tuple(t.prompt) == tuple(q))
            mine = extractors[turn.task](decode(turn.gold))
            other = next((t.gold for t in by_task[turn.task]
                          if extractors[turn.task](decode(t.gold)) not in (None, mine)), None)
            out.append(other if other is not None else tokenizer("nothing", add_special_tokens=False)["input_ids"])
        return out

    wrong_result = evaluate_actions(records, wrong, decode, max_items=None, show_progress=False)
    for task, v in wrong_result["tasks"].items():
        assert v["accuracy"] == 0.0, task
    garbage = evaluate_actions(records, lambda p, b, on_batch=None: [[5, 6, 7]] * len(p), decode, max_items=None,
                               show_progress=False)
    assert all(v["unparsed_rate"] == 1.0 and v["accuracy"] == 0.0 for v in garbage["tasks"].values())


def test_max_items_bounds_records_per_task_and_other_tasks_are_skipped(records):
    echo = lambda p, b, on_batch=None: [[]] * len(p)
    one = evaluate_actions(records, echo, lambda ids: "", max_items=1, show_progress=False)
    assert all(v["records"] == 1 for v in one["tasks"].values())
    assert "sharegpt_gpt4" in one["skipped_records"] or any(k.startswith("sharegpt") for k in one["skipped_records"])
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer

    decode = load_tokenizer(SAMPLE_TOKENIZER_DIR).decode
    long = evaluate_actions(records, echo, decode, max_items=1, max_length=8, show_progress=False)
    assert long["too_long_turns"] > 0 and long["overall"]["scored_turns"] == 0


def test_only_turns_with_a_gold_action_are_generated(records):
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer

    decode = load_tokenizer(SAMPLE_TOKENIZER_DIR).decode
    asked = []

    def complete(prompts, budgets, on_batch=None):
        asked.extend(prompts)
        return [[]] * len(prompts)

    result = evaluate_actions(records, complete, decode, max_items=None, show_progress=False)
    total = sum(v["turns"] for v in result["tasks"].values())
    assert len(asked) == result["overall"]["scored_turns"] < total  # the "OK." turns are counted, not generated
    capped = evaluate_actions(records, complete, decode, max_items=None, max_turns=2, show_progress=False)
    for task, v in capped["tasks"].items():
        assert v["scored_turns"] == min(2, result["tasks"][task]["scored_turns"]), task
    assert sum(v["scored_turns"] for v in capped["tasks"].values()) < result["overall"]["scored_turns"]
