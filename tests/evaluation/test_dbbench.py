"""Suite `dbbench`: the SQLite port of AgentBench's table hash reproduces AgentBench's answer_md5; scripted
agents: gold answers score 100 %, wrong ones 0 %, malformed turns end episodes as invalid format."""

from __future__ import annotations

import hashlib
import json

import pytest

from agentlm_jax.errors import ConfigError
from agentlm_jax.evaluation import dbbench
from agentlm_jax.evaluation.dbbench import (Database, answer_correct, evaluate_dbbench, gold_hash, load_items,
                                            mysql_to_sqlite)
from tests.evaluation.conftest import shared_items


def _mismatches(items):
    return [(it.index, gold_hash(it)) for it in items if it.is_mutation and gold_hash(it)[0] != it.answer_md5]


def test_the_hash_reproduces_every_dev_mutation():
    items = shared_items("dev")
    mutations = [it for it in items if it.is_mutation]
    assert len(mutations) == 40
    assert _mismatches(items) == []


def test_the_hash_reproduces_all_test_mutations_but_one():
    """Item 225 (UPDATE football_stats SET Points = '16' WHERE Player = 'Johnson'): its answer_md5 is neither
    the table's hash before nor after the gold statement; nothing found explains it (docs/evaluation.md)."""
    items = shared_items("standard")
    assert sum(it.is_mutation for it in items) == 200
    bad = _mismatches(items)
    assert [index for index, _ in bad] == [225]
    assert bad[0][1][1] is None  # the statement ran without error


def test_the_hash_of_the_package_sample():
    items, _ = load_items()
    assert 5 <= len(items) <= 10 and {it.type for it in items} >= {"INSERT", "UPDATE", "DELETE", "counting"}
    assert _mismatches(items) == []


def _gold(episodes):
    out = []
    for e in episodes:
        item = e.item
        if item.is_mutation and e.rounds == 0:
            out.append("I will change the table.\nAction: Operation\n```sql\n" + "; ".join(item.label) + "\n```")
        else:
            out.append("Done.\nAction: Answer\nFinal Answer: " + json.dumps(list(item.label)))
    return out


def _wrong(episodes):
    out = []
    for e in episodes:
        item = e.item
        if item.is_mutation and e.rounds == 0:
            out.append(f"Action: Operation\n```sql\nDELETE FROM {dbbench.quote_name(item.table)}\n```")
        else:
            out.append('Action: Answer\nFinal Answer: ["certainly not this"]')
    return out


def test_gold_answers_score_everything_and_wrong_ones_nothing():
    items = shared_items("dev")
    gold = evaluate_dbbench(items, _gold, show_progress=False)
    assert gold["overall_cat_accuracy"] == 1.0
    assert gold["SELECT_accuracy"] == gold["INSERT_accuracy"] == gold["UPDATE_accuracy"] == 1.0
    assert gold["status"] == {"completed": 60} and gold["invalid_format_rate"] == 0.0
    wrong = evaluate_dbbench(items, _wrong, show_progress=False)
    assert wrong["overall_cat_accuracy"] == 0.0 and wrong["status"] == {"completed": 60}


def test_malformed_turns_end_the_episode_as_invalid_format():
    items, _ = load_items()

    def respond(episodes):
        return [["I think it is 2.",  # no Action
                 "Action: Operation\nSELECT 1;",  # no ```sql block
                 "Action: Answer\nit is 2"][e.item.index % 3] for e in episodes]

    result = evaluate_dbbench(items, respond, show_progress=False)
    assert result["status"] == {"invalid_format": len(items)} and result["invalid_format_rate"] == 1.0
    assert result["SELECT_accuracy"] == 0.0


def test_at_most_five_statements_then_the_episode_ends():
    items, _ = load_items()
    seen = []

    def respond(episodes):
        seen.extend(e.rounds for e in episodes)
        return ["Action: Operation\n```sql\nSELECT COUNT(*) FROM " + dbbench.quote_name(e.item.table) + "\n```"
                for e in episodes]

    result = evaluate_dbbench(items[:1], respond, max_rounds=5, show_progress=False)
    assert seen == [0, 1, 2, 3, 4, 5] and result["status"] == {"round_limit": 1}


def test_the_model_sees_the_raw_response():
    items, _ = load_items()
    item = next(it for it in items if it.type == "counting")
    episodes = dbbench.run_episodes([item], lambda eps: [
        "Action: Operation\n```sql\nSELECT COUNT(*) FROM `Orchard Harvest` WHERE Variety = 'gala'\n```"
        if e.rounds == 0 else 'Action: Answer\nFinal Answer: ["2"]' for e in eps], show_progress=False)
    (episode,) = episodes
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert episode.messages[0]["content"] == dbbench.INSTRUCTION and episode.messages[1]["content"] == "Ok."
    assert episode.messages[2]["content"].startswith(item.question.split("\n")[0])
    assert episode.messages[4]["content"] == "[(2,)]"  # case-insensitive, as MySQL's collation
    assert episode.correct


@pytest.mark.parametrize("answer, label, ok", [
    (' ["Cleo"]', ["Cleo"], True),
    (' ["cleo"]', ["Cleo"], False),
    (" [3]", ["3.0"], True),
    (' ["1,000"]', ["1000"], False),
    (" [0.30000001]", ["0.3"], True),  # numbers within 1e-6
    (" [0.31]", ["0.3"], False),
    (' ["b", "a"]', ["a", "b"], True),  # several values: sets
    (' ["a"]', ["a", "b"], False),
    (" 42", ["42"], True),  # not a list: the text itself
    (" __import__('os')", ["x"], False),  # never evaluated
])
def test_answer_comparison(answer, label, ok):
    assert answer_correct(answer, label) is ok


def test_mysql_lexical_rules():
    assert mysql_to_sqlite(r"SELECT 'a\nb', 'it\'s', 'o''k'") == "SELECT 'a\nb', 'it''s', 'o''k'"
    assert mysql_to_sqlite('SELECT * FROM t WHERE x = "y"') == "SELECT * FROM t WHERE x = 'y'"
    assert mysql_to_sqlite("INSERT INTO 1952_Race_0 VALUES (1e5)") == "INSERT INTO `1952_Race_0` VALUES (1e5)"
    assert mysql_to_sqlite("SELECT `a``b` FROM `1x`") == "SELECT `a``b` FROM `1x`"


def test_hash_semantics_nulls_empty_table_and_group_concat_limit():
    def item(rows, columns=("a", "b")):
        return dbbench.Item(0, "INSERT", "q", "t", columns, tuple(map(tuple, rows)), ("",), "")

    def md5(text):
        return hashlib.md5(text.encode()).hexdigest()

    db = Database(item([["x", None], [None, None]]))
    # concat_ws skips NULLs: 'x' and '' ; sorted 5-character prefixes joined by ','
    assert db.table_hash() == str([(md5(",".join(sorted([md5("x")[:5], md5("")[:5]]))),)])
    assert Database(item([])).table_hash() == "[(None,)]"
    rows = [[str(i), "v"] for i in range(200)]
    hashes = sorted(md5(f"{i},v")[:5] for i in range(200))
    full = ",".join(hashes)
    assert len(full) > 1024
    assert Database(item(rows)).table_hash() == str([(md5(full[:1024]),)])


def test_bad_item_files_are_named(tmp_path):
    path = tmp_path / "items.jsonl"
    good = json.loads(dbbench.resources.files("agentlm_jax.evaluation").joinpath(dbbench.SAMPLE_ITEMS)
                      .read_text().splitlines()[0])
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: not JSON"):
        load_items(str(path))
    mutation = dict(good, type=["UPDATE"])
    path.write_text(json.dumps(mutation) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: a UPDATE item needs 'answer_md5'"):
        load_items(str(path))
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "table"}) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: no 'table' field"):
        load_items(str(path))


def test_the_model_plays_episodes(tiny_lm):
    """A random model: its turns are malformed, each episode ends after one turn as invalid format; the
    prompts are the chat template's rendering of the history."""
    items, _ = load_items(limit=4)
    result = evaluate_dbbench(items, dbbench.model_respond(tiny_lm, max_new_tokens=8), show_progress=False)
    assert result["episodes"] == 4 and result["status"] == {"invalid_format": 4}
    episode = dbbench.start_episode(items[0])
    ids = tiny_lm.chat_prompt(episode.messages)
    text = tiny_lm.tokenizer.decode(ids)
    assert "[INST]" in text and "Ok." in text and items[0].question.split("\n")[0][:30] in text
