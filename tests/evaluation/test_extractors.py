"""The action extractors read every loss-carrying turn of the bundled AgentInstruct sample (bar the bare
acknowledgements), normalise harmless differences away, and tell different actions apart."""

from __future__ import annotations

import json

import pytest

from agentlm_jax.evaluation.extractors import EXTRACTORS, extractor_for
from data_pipeline.sample_data import __file__ as sample_init

SAMPLE = sample_init.replace("__init__.py", "agentinstruct_sample.jsonl")
ACKNOWLEDGEMENTS = {"OK", "Ok.", "I've understood your instruction, start please."}


def _sample_turns():
    with open(SAMPLE) as f:
        for line in f:
            record = json.loads(line)
            task = record.get("task") or record["id"].rsplit("_", 1)[0]
            for turn in record["conversations"]:
                if turn["from"] == "gpt":
                    yield task, turn["value"]


def test_every_sample_action_parses_and_acknowledgements_do_not():
    seen = {task: 0 for task in EXTRACTORS}
    for task, text in _sample_turns():
        action = extractor_for(task)(text)
        if text.strip() in ACKNOWLEDGEMENTS or text.startswith("OK. I'll follow"):
            assert action is None, (task, text)
        else:
            assert action is not None, (task, text)
            seen[task] += 1
    assert all(n > 0 for n in seen.values()), seen


@pytest.mark.parametrize("task, a, b", [
    ("os", "Think: x\n\nAct: bash\n\n```bash\nls  -l /tmp\n```", "Think: other words\nAct: bash\n```bash\nls -l /tmp\n```"),
    ("os", "Think: done.\n\nAct: answer(28)", "Act: answer( 28 )"),
    ("db", "Action: Operation\n```sql\nSELECT  a FROM t;\n```", "I think.\nAction: Operation\n```sql\nselect a\nfrom t\n```"),
    ("db", 'Action: Answer\nFinal Answer: ["x", "y"]', "Action: Answer\nFinal Answer: ['y', 'x']"),
    ("alfworld", "THOUGHT: go.\n ACTION: go to drawer 1", "ACTION: Go to  drawer 1"),
    ("webshop", "Thought:\nI search.\n\nAction:\nsearch[red  phone case]", "Action: search[Red phone case]"),
    ("kg", "Thought: t\nAction: get_neighbors(Apollo 11, spaceflight.mission.crew)",
     "Action: get_neighbors(Apollo 11,spaceflight.mission.crew)"),
    ("kg", "Thought: done\nFinal Answer: #3", "Action: Final Answer: #3"),
    ("mind2web", "Thought: t\nAnswer: C.\nAction: TYPE\nValue: Chicago", "Answer: C.\nAction: TYPE\nValue: chicago"),
])
def test_same_action_different_wording_compares_equal(task, a, b):
    extract = extractor_for(task)
    assert extract(a) is not None and extract(a) == extract(b)


@pytest.mark.parametrize("task, a, b", [
    ("os", "Act: bash\n```bash\nls /tmp\n```", "Act: bash\n```bash\nls /var\n```"),
    ("os", "Act: answer(28)", "Act: finish"),
    ("db", "Action: Operation\n```sql\nSELECT a FROM t\n```", "Action: Answer\nFinal Answer: [\"a\"]"),
    ("db", 'Action: Answer\nFinal Answer: ["1"]', 'Action: Answer\nFinal Answer: ["2"]'),
    ("alfworld", "ACTION: go to drawer 1", "ACTION: go to drawer 2"),
    ("webshop", "Action:\nsearch[red case]", "Action:\nclick[red case]"),
    ("kg", "Action: get_relations(Apollo 11)", "Action: get_relations(Apollo 12)"),
    ("kg", "Final Answer: #3", "Final Answer: #2"),
    ("mind2web", "Answer: B.\nAction: CLICK", "Answer: C.\nAction: CLICK"),
    ("mind2web", "Answer: C.\nAction: TYPE\nValue: paris", "Answer: C.\nAction: SELECT\nValue: paris"),
])
def test_different_actions_differ(task, a, b):
    extract = extractor_for(task)
    assert extract(a) is not None and extract(b) is not None and extract(a) != extract(b)


@pytest.mark.parametrize("task, text", [
    ("os", "Act: bash\nls /tmp"),  # no code block
    ("db", "Action: Operation\nSELECT 1"),  # no ```sql block
    ("db", "Action: Answer\nthe answer is 3"),  # no Final Answer
    ("alfworld", "THOUGHT: I should look around."),
    ("webshop", "search[red case]"),  # no Action:
    ("kg", "Action: walk(Apollo 11)"),  # not a KB tool
    ("mind2web", "Answer: C.\nAction: TYPE"),  # TYPE without a value
])
def test_malformed_actions_are_none(task, text):
    assert extractor_for(task)(text) is None


def test_task_names():
    assert extractor_for("os_interaction") is EXTRACTORS["os"] and extractor_for("DB") is EXTRACTORS["db"]
    assert extractor_for("sharegpt") is None and extractor_for("webshop_v2") is EXTRACTORS["webshop"]
