"""Validation/normalisation policies, task detection and the reward filter: one test per policy."""

import json
import math

import pytest

from data_pipeline.formats.chat_template import Pair
from data_pipeline.normalize import FILTERED, NOTHING_TO_LEARN, REJECTED, Conversation, Dropped, normalize
from data_pipeline.sources import RawItem

THRESHOLDS = {"default": 1.0, "mind2web": 2 / 3}


def run(record, kind="general", split=None, source="src"):
    item = RawItem(record, "/data/file.jsonl", 7, 100, split=split)
    return normalize(item, source, kind, lambda task: THRESHOLDS.get(task, THRESHOLDS["default"]))


def turns(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


def test_canonical_record_passes_untouched():
    conv, repairs = run({"id": "a", "conversations": turns(("human", "Q1"), ("gpt", "A1"), ("human", "Q2"),
                                                            ("gpt", "A2"))})
    assert isinstance(conv, Conversation) and repairs == ()
    assert conv.pairs == (Pair("Q1", "A1"), Pair("Q2", "A2")) and conv.system is None
    assert (conv.id, conv.task, conv.kind, conv.location) == ("a", "src", "general", ("/data/file.jsonl", 7))


@pytest.mark.parametrize("user,assistant", [("human", "gpt"), ("user", "assistant"), ("USER", "ChatGPT"),
                                            ("human", "bing"), ("human", "bard"), ("user", "model")])
def test_role_names_are_mapped(user, assistant):
    conv, repairs = run({"id": "a", "conversations": turns((user, "Q"), (assistant, "A"))})
    assert conv.pairs == (Pair("Q", "A"),)
    canonical = {user.lower(), assistant.lower()} <= {"human", "gpt", "user", "assistant"}
    assert repairs == (() if canonical else ("role_alias",))


def test_openai_style_keys_are_accepted():
    conv, _ = run({"id": "a", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
    assert conv.pairs == (Pair("Q", "A"),)


def test_openchat_sharegpt_gpt4_items_are_accepted():
    # openchat/openchat_sharegpt_v3 sharegpt_gpt4.json (the GPT-4-only ShareGPT release) keeps the turns in "items"
    conv, _ = run({"id": "a", "items": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})
    assert conv.pairs == (Pair("Q", "A"),)


def test_leading_system_turn_becomes_the_system_prompt():
    conv, repairs = run({"id": "a", "conversations": turns(("system", "Be a pirate."), ("human", "Q"), ("gpt", "A"))})
    assert conv.system == "Be a pirate." and conv.pairs == (Pair("Q", "A"),)
    assert repairs == ("system_prompt_from_record",)


def test_system_turn_mid_conversation_is_rejected():
    result, _ = run({"id": "a", "conversations": turns(("human", "Q"), ("system", "S"), ("gpt", "A"))})
    assert result == Dropped(REJECTED, "system_turn_mid_conversation", "turn 1")


def test_leading_assistant_turns_are_dropped():
    conv, repairs = run({"id": "a", "conversations": turns(("gpt", "Hello!"), ("gpt", "Hi?"), ("human", "Q"),
                                                            ("gpt", "A"))})
    assert conv.pairs == (Pair("Q", "A"),)
    assert set(repairs) == {"dropped_leading_assistant", "merged_consecutive_turns"}


def test_consecutive_same_role_turns_are_merged():
    conv, repairs = run({"id": "a", "conversations": turns(("human", "I have a question. "), ("human", "What is 2+2?"),
                                                            ("gpt", "It is"), ("gpt", "4."))})
    assert conv.pairs == (Pair("I have a question.\n\nWhat is 2+2?", "It is\n\n4."),)
    assert repairs == ("merged_consecutive_turns",)


def test_merged_answer_has_loss_only_if_all_parts_had():
    rec = {"id": "os_1", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "loss": False, "value": "demo"},
                                           {"from": "gpt", "loss": True, "value": "real"}, {"from": "human", "value": "Q2"},
                                           {"from": "gpt", "loss": True, "value": "A2"}]}
    conv, _ = run(rec, kind="agent")
    assert conv.pairs == (Pair("Q", "demo\n\nreal", loss=False), Pair("Q2", "A2", loss=True))


def test_empty_values_drop_the_turn():
    conv, repairs = run({"id": "a", "conversations": turns(("human", "Q"), ("gpt", "  "), ("human", "Q2"), ("gpt", "A2"))
                         + [{"from": "human", "value": None}]})
    assert conv.pairs == (Pair("Q\n\nQ2", "A2"),)
    assert repairs == ("dropped_empty_turn", "merged_consecutive_turns")


@pytest.mark.parametrize("value", [123, ["a"], {"text": "a"}, True])
def test_non_string_values_are_rejected(value):
    result, _ = run({"id": "a", "conversations": turns(("human", "Q")) + [{"from": "gpt", "value": value}]})
    assert result.bucket == REJECTED and result.reason == "non_string_value"


@pytest.mark.parametrize("role", ["function", "critic", "ipython", None, 3])
def test_unknown_roles_are_rejected(role):
    result, _ = run({"id": "a", "conversations": turns(("human", "Q")) + [{"from": role, "value": "x"}]
                     + turns(("gpt", "A"))})
    assert result.bucket == REJECTED and result.reason == "unknown_role"


def test_trailing_user_turn_is_dropped():
    conv, repairs = run({"id": "a", "conversations": turns(("human", "Q"), ("gpt", "A"), ("human", "unanswered"))})
    assert conv.pairs == (Pair("Q", "A"),) and repairs == ("dropped_trailing_user",)


@pytest.mark.parametrize("conversations", [[], turns(("human", "only a question")), turns(("gpt", "only an answer")),
                                           turns(("human", ""), ("gpt", ""))])
def test_records_with_nothing_to_learn_are_filtered(conversations):
    result, _ = run({"id": "a", "conversations": conversations})
    assert result == Dropped(FILTERED, NOTHING_TO_LEARN)


def test_only_demonstration_answers_means_nothing_to_learn():
    rec = {"id": "os_0", "conversations": [{"from": "human", "loss": None, "value": "Q"},
                                           {"from": "gpt", "loss": False, "value": "demo"}]}
    assert run(rec, kind="agent")[0] == Dropped(FILTERED, NOTHING_TO_LEARN)


def test_loss_flags_follow_agentinstruct():
    flags = [False, False, False, True, True, None]
    convs = []
    for i, flag in enumerate(flags):
        convs += [{"from": "human", "loss": None, "value": f"Q{i}"}, {"from": "gpt", "loss": flag, "value": f"A{i}"}]
    conv, _ = run({"id": "os_0", "conversations": convs}, kind="agent")
    assert [p.loss for p in conv.pairs] == [False, False, False, True, True, True]
    bad, _ = run({"id": "os_0", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "loss": "yes", "value": "A"}]})
    assert bad == Dropped(REJECTED, "bad_loss_flag", "turn 1: loss 'yes'")


@pytest.mark.parametrize("record,reason", [
    ("a string", "not_an_object"), (["a", "list"], "not_an_object"), ({"id": "a"}, "missing_conversations"),
    ({"id": "a", "conversations": "text"}, "missing_conversations"), ({"id": "a", "conversations": ["x"]}, "turn_not_an_object"),
    ({"id": {"x": 1}, "conversations": []}, "bad_id"),
])
def test_structural_problems_are_rejected(record, reason):
    result, _ = run(record)
    assert result.bucket == REJECTED and result.reason == reason


def test_missing_id_is_derived_from_the_location():
    conv, repairs = run({"conversations": turns(("human", "Q"), ("gpt", "A"))})
    assert conv.id == "file.jsonl#7" and repairs == ("missing_id",)
    conv, _ = run({"id": 17, "conversations": turns(("human", "Q"), ("gpt", "A"))})
    assert conv.id == "17"


def test_missing_ids_are_unique_in_a_directory_and_independent_of_where_it_is(tmp_path):
    """DIR/a/d.jsonl and DIR/b/d.jsonl: same file name, distinct records → distinct ids (the path within the
    source), the same wherever DIR is (ids feed the hash-based sampling, split and shard assignment)."""
    from data_pipeline.config import SourceConfig
    from data_pipeline.sources import expand_source, read_task

    def ids(root):
        for sub in ("a", "b"):
            (root / sub).mkdir(parents=True)
            (root / sub / "d.jsonl").write_text(json.dumps({"conversations": turns(("human", "Q"), ("gpt", sub))}))
        items = [i for t in expand_source(SourceConfig(str(root)), "general") for i in read_task(t)]
        return [normalize(i, "s", "general", lambda t: 1.0)[0].id for i in items]
    assert ids(tmp_path / "here") == ["a/d.jsonl#1", "b/d.jsonl#1"] == ids(tmp_path / "else/where")
    item = RawItem({"conversations": turns(("human", "Q"), ("gpt", "A"))}, "gs://b/raw/x/d.jsonl", 2, rel_path="x/d.jsonl")
    assert normalize(item, "s", "general", lambda t: 1.0)[0].id == "x/d.jsonl#2"


def test_parse_errors_from_the_reader_are_rejections():
    item = RawItem(None, "/data/x.json", 3, 10, error="truncated_json_array", raw="{...")
    assert normalize(item, "s", "general", lambda t: 1.0) == (Dropped(REJECTED, "truncated_json_array"), ())


# ----------------------------------------------------------------------------------------- task and reward
def agent(record_id=None, **fields):
    return {**({"id": record_id} if record_id is not None else {}),
            "conversations": turns(("human", "Q"), ("gpt", "A")), **fields}


def test_task_from_field_then_id_prefix_then_split_then_source():
    assert run(agent("os_12", task="db"), kind="agent")[0].task == "db"
    assert run(agent("os_12"), kind="agent")[0].task == "os"
    assert run(agent("my_new_task_3"), kind="agent")[0].task == "my_new_task"
    assert run(agent("noprefix"), kind="agent", split="webshop")[0].task == "webshop"
    conv, repairs = run(agent("noprefix"), kind="agent", source="agentsrc")
    assert conv.task == "agentsrc" and "task_from_source_name" in repairs
    assert run(agent("os_1", task=5), kind="agent")[0] == Dropped(REJECTED, "non_string_task", "5")
    assert run(agent("os_1", task="db"), kind="general", source="sharegpt")[0].task == "sharegpt"


@pytest.mark.parametrize("task,reward,kept", [
    ("os", 1.0, True), ("os", 1, True), ("os", 0.99, False), ("os", 0.0, False),
    ("mind2web", 2 / 3, True), ("mind2web", 0.6667, True), ("mind2web", 0.66, False), ("mind2web", 1.0, True),
    ("mind2web", 1 / 3, False), ("kg", None, True),
    # the 1e-6 tolerance: float noise and 6+ decimals pass; values rounded down to fewer decimals don't
    ("os", 1 - 1e-9, True), ("os", 0.99999, False), ("mind2web", 0.666666, True), ("mind2web", 0.6666, False),
])
def test_reward_filter(task, reward, kept):
    rec = agent(f"{task}_1", **({"reward": reward} if reward is not None else {}))
    result, _ = run(rec, kind="agent")
    if kept:
        assert isinstance(result, Conversation)
    else:
        assert result.bucket == FILTERED and result.reason == "reward_below_threshold"


@pytest.mark.parametrize("reward", ["1.0", True, math.nan, math.inf, [1]])
def test_non_numeric_reward_is_rejected_not_a_crash(reward):
    result, _ = run(agent("os_1", reward=reward), kind="agent")
    assert result.bucket == REJECTED and result.reason == "non_numeric_reward"


def test_thresholds_are_configurable_per_task():
    item = RawItem(agent("webshop_1", reward=0.5), "f", 1)
    lenient = normalize(item, "s", "agent", lambda task: 0.5 if task == "webshop" else 1.0)[0]
    strict = normalize(item, "s", "agent", lambda task: 1.0)[0]
    assert isinstance(lenient, Conversation) and strict.reason == "reward_below_threshold"
