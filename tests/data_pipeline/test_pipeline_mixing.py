"""η mixing, sub-mix weights, validation split and hashing (pure functions; the Beam run is in test_pipeline.py)."""

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline import mixing
from data_pipeline.mixing import ExampleKey


def keys(source, kind, n, task=None):
    return [ExampleKey(source, kind, task or source, f"{source}_{i}") for i in range(n)]


def plan_for(agent_n, pools, eta, weights=None, fraction=0.0, seed=0):
    ks = keys("agent", "agent", agent_n, task="os")
    for name, n in pools.items():
        ks += keys(name, "general", n)
    plan = mixing.make_plan(ks, seed=seed, eta=eta, general_weights=weights, validation_fraction=fraction,
                            agent_sources=["agent"], general_sources=list(pools))
    chosen = [k for k in ks if mixing.is_selected(plan["mix_threshold"], seed, k)]
    return plan, ks, chosen


def test_stable_hash_is_fixed_and_independent_of_python_hash_seed():
    value = mixing.stable_hash(0, "mix", "sharegpt", "abc_0")
    script = "from data_pipeline.mixing import stable_hash; print(stable_hash(0, 'mix', 'sharegpt', 'abc_0'))"
    for hash_seed in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert int(out.stdout) == value
    assert value == 0x3D7F092BB28B7BC1  # pinned: changing the hash changes every dataset built before
    assert mixing.stable_hash(1, "mix", "sharegpt", "abc_0") != value
    assert mixing.stable_hash(0, "mix", "sharegpt", "abc_1") != value


@settings(max_examples=200, deadline=None)
@given(agent_n=st.integers(1, 400), eta=st.floats(0.05, 0.95), big=st.integers(0, 3000),
       small=st.integers(0, 3000), w=st.floats(0.05, 0.95))
def test_eta_within_one_example_and_weights_honoured(agent_n, eta, big, small, w):
    plan, _, chosen = plan_for(agent_n, {"gpt4": small, "gpt35": big}, eta, {"gpt4": w, "gpt35": 1 - w})
    agent = sum(k.kind == "agent" for k in chosen)
    general = {s: sum(k.source == s for k in chosen) for s in ("gpt4", "gpt35")}
    g = sum(general.values())
    assert agent == agent_n and plan["mix"]["eta_achieved"] == pytest.approx(agent / (agent + g))
    wanted = round(agent_n * (1 - eta) / eta)
    if small + big >= wanted:
        assert g == wanted
        assert abs(agent - eta * (agent + g)) <= 1  # agent / (agent + general) = eta within one example
        if general["gpt4"] < small and general["gpt35"] < big:  # neither pool ran short
            assert abs(general["gpt4"] - w * g) <= 1
    else:  # pool too small: everything is used and eta_achieved says so
        assert general == {"gpt4": small, "gpt35": big} and plan["mix"]["eta_achieved"] >= eta
    assert plan["mix"]["examples_per_source"] == {"agent": agent_n, **general}


def test_short_pool_gives_all_it_has_and_the_rest_comes_from_the_others(caplog):
    plan, _, chosen = plan_for(100, {"gpt4": 10, "gpt35": 1000}, 0.2, {"gpt4": 0.2, "gpt35": 0.8})
    assert plan["mix"]["examples_per_source"] == {"agent": 100, "gpt4": 10, "gpt35": 390}
    assert "sub-mix differs" in caplog.text


def test_too_small_general_pool_warns_and_reports_eta_achieved(caplog):
    plan, _, _ = plan_for(100, {"g": 50}, 0.2)
    assert plan["mix"]["general_examples"] == 50 and plan["mix"]["eta_achieved"] == pytest.approx(100 / 150)
    assert "too small" in caplog.text


def test_eta_extremes_and_missing_sources():
    assert plan_for(10, {"g": 50}, 1.0)[0]["mix"]["examples_per_source"] == {"agent": 10, "g": 0}
    assert plan_for(10, {"g": 50}, 0.0)[0]["mix"]["examples_per_source"] == {"agent": 0, "g": 50}
    assert plan_for(0, {"g": 50}, 0.2)[0]["mix"]["general_examples"] == 50  # no agent data: all general


def test_default_weights_follow_pool_sizes():
    plan, _, _ = plan_for(100, {"a": 300, "b": 900}, 0.2)
    assert plan["mix"]["examples_per_source"] == {"agent": 100, "a": 100, "b": 300}


def test_sampling_is_without_replacement_and_grows_monotonically():
    small = set(plan_for(50, {"g": 1000}, 0.5)[2])
    large = set(plan_for(50, {"g": 1000}, 0.2)[2])
    assert len(small) == 100 and len(large) == 250 and small <= large
    other_seed = set(plan_for(50, {"g": 1000}, 0.2, seed=1)[2])
    assert other_seed != large and len(other_seed) == 250


def test_validation_split_per_task_is_deterministic():
    ks = keys("a", "agent", 200, task="os") + keys("b", "agent", 7, task="db") + keys("c", "agent", 1, task="kg")
    plan = mixing.make_plan(list(reversed(ks)), seed=3, eta=1.0, general_weights=None, validation_fraction=0.1,
                            agent_sources=["a", "b", "c"], general_sources=[])
    val = [k for k in ks if mixing.split_of(plan, k) == "validation"]
    assert sum(k.task == "os" for k in val) == 20
    assert sum(k.task == "db" for k in val) == 1  # at least one per task with two or more examples
    assert sum(k.task == "kg" for k in val) == 0
    again = mixing.make_plan(ks, seed=3, eta=1.0, general_weights=None, validation_fraction=0.1,
                             agent_sources=["a", "b", "c"], general_sources=[])
    assert [mixing.split_of(again, k) for k in ks] == [mixing.split_of(plan, k) for k in ks]


def test_largest_remainder_sums_exactly():
    assert mixing.largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert sum(mixing.largest_remainder(7, {"a": 0.2, "b": 0.8}).values()) == 7
