"""The trainer's evaluator: flat metrics from the suites; the compiled generator is reused across calls and
always decodes with the model's current weights; eval.max_items bounds the turns per task."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from agentlm_jax.config import EvalConfig
from agentlm_jax.evaluation.actions import read_split, select_turns
from agentlm_jax.evaluation.in_loop import InLoopEvaluator
from agentlm_jax.evaluation.lm import GREEDY as LM_GREEDY
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


def test_prompts_of_any_length_compile_a_few_programs_and_decode_as_unbucketed(tokenizer):
    from agentlm_jax.inference import generate

    import dataclasses

    # a model shape of this test alone, so that no other test's compiled programs count here
    model = init_model(dataclasses.replace(TINY_EVAL, intermediate_size=96), seed=4)
    lm = LM(model, tokenizer, batch_size=4)
    assert lm.generator.shape(70, 48) == (96, 160) and lm.generator.shape(600, 100) == (768, 896)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 1000, size=n).tolist() for n in (5, 40, 70, 100, 130, 200, 250, 300, 390, 500, 510)]
    def programs():  # a partial batch's filler rows repeat a prompt, so it takes the shared-prefill program
        return generate._generate._cache_size() + generate._generate_shared._cache_size()

    before = programs()
    outs = lm.complete(prompts, max_new_tokens=[8, 9, 10, 11, 12, 13, 14, 15, 16, 7, 6])
    # 11 prompts in batches of 4 (sorted by length, longest 100, 300, 510): buckets 128, 384, 512, the last
    # batch filled up to 4 rows
    assert programs() - before == 3
    # other lengths in the same buckets (a partial batch of 3 is filled up to 4): nothing new to compile
    lm.complete([rng.integers(3, 1000, size=n).tolist() for n in (99, 110, 120, 127, 290, 330, 383, 383, 501, 510,
                                                                  512)], max_new_tokens=20)
    assert programs() - before == 3
    lm.complete([rng.integers(3, 1000, size=n).tolist() for n in (99, 110, 120, 127, 290)], max_new_tokens=20)
    assert programs() - before == 4  # a batch of 1 (not 4 rows) at bucket 384
    plain = generate.Generator(model, stop_token_ids=sorted(lm.generator.stop_ids.tolist()), pad_token_id=lm.pad_id)
    stops = set(lm.generator.stop_ids.tolist())
    for p, o, n in zip(prompts, outs, [8, 9, 10, 11, 12, 13, 14, 15, 16, 7, 6]):
        alone = plain([p], max_new_tokens=n, sampling=LM_GREEDY).tokens[0]
        assert o == (alone[:-1] if alone and alone[-1] in stops else alone)  # LM drops the stop token


def test_turns_of_one_conversation_share_a_prefill_and_decode_as_alone(tokenizer):
    """LM.complete puts the prompts that are prefixes of a longer one (a record's turns) in its batch, prefilled
    once (`_generate_shared`); every answer is what the prompt generates alone, in the prompts' order."""
    from agentlm_jax.inference import generate

    import dataclasses

    model = init_model(dataclasses.replace(TINY_EVAL, intermediate_size=80), seed=5)  # this test's shapes only
    lm = LM(model, tokenizer, batch_size=4)
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 1000, size=300).tolist(), rng.integers(3, 1000, size=120).tolist()
    prompts = [a[:50], b[:30], a[:200], b, a[:120], a]  # two conversations' turns, interleaved
    budgets = [5, 6, 7, 8, 9, 10]
    before = generate._generate_shared._cache_size()
    outs = lm.complete(prompts, max_new_tokens=budgets)
    # by source length, 4 rows a batch: [b[:30], b, a[:50], a[:120]] (sources b and a[:120]), [a[:200], a] (a)
    assert generate._generate_shared._cache_size() - before == 2
    plain = generate.Generator(model, stop_token_ids=sorted(lm.generator.stop_ids.tolist()), pad_token_id=lm.pad_id)
    stops = set(lm.generator.stop_ids.tolist())
    for p, o, n in zip(prompts, outs, budgets):
        alone = plain([p], max_new_tokens=n, sampling=LM_GREEDY).tokens[0]
        assert o == (alone[:-1] if alone and alone[-1] in stops else alone)


def test_a_turn_keeps_its_budget_beside_a_longer_turn_near_the_position_limit(tokenizer):
    """The turns of a record share a batch with its longest, which may have almost no room left under
    max_position_embeddings: the early turns still get their whole budget, the long one only its room."""
    from agentlm_jax.inference import generate

    model = init_model(TINY_EVAL, seed=7)
    lm = LM(model, tokenizer, batch_size=4)
    a = np.random.default_rng(3).integers(3, 1000, size=TINY_EVAL.max_position_embeddings - 6).tolist()
    outs = lm.complete([a[:40], a], max_new_tokens=[16, 16])
    plain = generate.Generator(model, stop_token_ids=[], pad_token_id=lm.pad_id)
    stops = set(lm.generator.stop_ids.tolist())
    for p, o, n in zip([a[:40], a], outs, [16, 6]):
        alone = plain([p], max_new_tokens=n, sampling=LM_GREEDY).tokens[0]
        cut = next((k for k, t in enumerate(alone) if t in stops), None)
        assert o == (alone if cut is None else alone[:cut])
    assert len(outs[1]) <= 6


def test_summary_line_names_the_headline_numbers_then_the_tasks():
    from agentlm_jax.evaluation.suites import summary_line

    flat = {"eval/actions/os/accuracy": 0.5, "eval/actions/os/unparsed_rate": 0.25, "eval/actions/accuracy": 0.4,
            "eval/dbbench/success": 0.125, "eval/actions/db/accuracy": 0.3, "eval/seconds": 2.0}
    assert summary_line(flat) == "actions 0.400; dbbench 0.125; os 0.500; db 0.300"
    assert summary_line({"eval/seconds": 1.0}) == "nothing scored"


def test_one_shape_runs_every_batch_of_a_call_in_one_program_of_each_kind(tokenizer):
    """LM(one_shape=True), as the in-loop evaluator builds it: batches of different lengths, budgets, nestings and
    sizes are padded to one shape per kind (those that share a prefill, those that do not), and every answer is
    the prompt's alone."""
    from agentlm_jax.inference import generate

    import dataclasses

    model = init_model(dataclasses.replace(TINY_EVAL, intermediate_size=72), seed=6)  # this test's shapes only
    lm = LM(model, tokenizer, batch_size=4, one_shape=True)
    rng = np.random.default_rng(2)
    a = rng.integers(3, 1000, size=400).tolist()
    others = [rng.integers(3, 1000, size=n).tolist() for n in (20, 30, 40, 50, 60, 70, 80, 90)]
    # spread over 3 batches of 4: [a[:100], a[:250], a, 60] (2 sources: shared), [20, 40, 70, 90] (4 distinct:
    # plain), [30, 50, 80] (3 distinct, filled up to 4 rows with a repeat: shared); budgets on both sides of the
    # 64-token capacity step in both kinds
    prompts = others + [a[:100], a[:250], a]
    budgets = [4, 5, 6, 7, 80, 9, 100, 11, 12, 90, 13]
    assert [sorted(len(prompts[i]) for i in b) for b in lm._batches(prompts, budgets) for b in [b[0]]] == \
        [[60, 100, 250, 400], [20, 40, 70, 90], [30, 50, 80]]

    before = {f: f._cache_size() for f in (generate._generate, generate._generate_shared)}
    outs = lm.complete(prompts, max_new_tokens=budgets)
    assert {f.__name__: f._cache_size() - n for f, n in before.items()} == {"_generate": 1, "_generate_shared": 1}
    plain = generate.Generator(model, stop_token_ids=sorted(lm.generator.stop_ids.tolist()), pad_token_id=lm.pad_id)
    stops = set(lm.generator.stop_ids.tolist())
    for p, o, n in zip(prompts, outs, budgets):
        alone = plain([p], max_new_tokens=n, sampling=LM_GREEDY).tokens[0]
        assert o == (alone[:-1] if alone and alone[-1] in stops else alone)


def test_default_budgets_leave_every_gold_turn_room_for_its_action(sample_data, tokenizer):
    """With eval.* at its defaults, every turn the bundled sample's evaluation generates may run at least as long
    as its gold turn: a model that answers as the data does is never cut off before its action."""
    from agentlm_jax.evaluation import actions

    records, where = read_split(sample_data, "validation")
    cfg = EvalConfig()
    req = actions.requests(records, lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
                           max_items=None, max_new_tokens=cfg.max_new_tokens, max_length=1024,
                           max_turns=cfg.max_items)
    assert len(req.flat) >= len(TASKS)
    assert all(budget >= len(t.gold) for t, budget in zip(req.flat, req.budgets))
    assert max(len(t.gold) for t in req.flat) > 48  # what the old default (48) cut short


def test_spread_groups_balances_sources_over_the_fewest_batches():
    from agentlm_jax.evaluation.lm import spread_groups

    groups = [[0], [1, 2], [3, 4], [5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # 16 rows, 6 records
    batches = spread_groups(groups, 8)
    assert sorted(i for b in batches for i in b) == list(range(16))
    assert len(batches) == 2 and all(len(b) == 8 for b in batches)
    # each record whole in one batch, three records in each (in order of length: four and two per batch before)
    assert sorted(sum(g[0] in b for g in groups) for b in batches) == [3, 3]
    assert all(any(set(g) <= set(b) for b in batches) for g in groups)
    # a record longer than a batch is cut into batch-sized pieces
    assert [len(b) for b in spread_groups([list(range(10))], 4)] == [4, 4, 2]


@pytest.mark.parametrize("sharded", [False, True])
def test_programs_compiled_ahead_leave_the_first_evaluation_nothing_to_compile(sample_data, tokenizer, sharded):
    """`compile_in_background` (the trainer calls it before its first step) compiles what the actions suite runs
    with the parameters' shapes (and shardings, as training's committed ones) alone: the first evaluation then
    compiles nothing and scores what an evaluator that compiled nothing ahead scores."""
    import dataclasses

    import jax

    from agentlm_jax import sharding

    records, where = read_split(sample_data, "validation")
    cfg_model = dataclasses.replace(TINY_EVAL, intermediate_size=88 + 8 * sharded)  # this test's shapes only
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2)) if sharded else None
    model = init_model(cfg_model, seed=8, mesh=mesh)
    cfg = EvalConfig(max_items=2, max_new_tokens=12)
    compiles = []

    def listen(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        ahead = InLoopEvaluator(cfg, tokenizer, records, where=where)
        ahead.compile_in_background(model).join()
        assert compiles  # it did compile something
        compiles.clear()
        first = ahead(model)
        assert compiles == []
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert first["eval/compile_seconds"] > 0 and "eval/compile_seconds" not in ahead(model)
    plain = InLoopEvaluator(cfg, tokenizer, records, where=where)(init_model(cfg_model, seed=8, mesh=mesh))
    assert {k: v for k, v in first.items() if "seconds" not in k} == \
        {k: v for k, v in plain.items() if "seconds" not in k}


def test_a_compile_ahead_that_cannot_start_or_fails_never_stops_training(sample_data, tokenizer, monkeypatch, caplog):
    """A bad validation record, or a compile error, is logged; the evaluation then runs (or fails) as it would
    have without compiling ahead, and no compile time is reported."""
    from agentlm_jax.evaluation import actions

    records, where = read_split(sample_data, "validation")
    model = init_model(TINY_EVAL, seed=9)
    evaluator = InLoopEvaluator(EvalConfig(max_items=1, max_new_tokens=4), tokenizer, records, where=where)
    monkeypatch.setattr(actions, "requests", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad record")))
    assert evaluator.compile_in_background(model) is None
    assert "bad record" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(evaluator._lm(model), "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("oom")))
    evaluator.compile_in_background(model).join()
    assert "oom" in caplog.text
    metrics = evaluator(model)
    assert "eval/compile_seconds" not in metrics and metrics["eval/actions/scored_turns"] > 0
