"""`python -m agentlm_jax.evaluate`: eval.json and eval.md for every suite on a tiny exported model; user
errors are one `error: ...` line before the model loads."""

from __future__ import annotations

import json

import pytest

from agentlm_jax import evaluate
from tests.helpers.cli import error_line, refuse_loading


def test_every_suite_writes_eval_json_and_markdown(tiny_hf_dir, sample_data, tmp_path):
    out = tmp_path / "eval"
    results = evaluate.main(["--model", tiny_hf_dir, "--suite", "all", "--data", sample_data, "--max-items", "2",
                             "--max-new-tokens", "8", "--gsm8k-max-new-tokens", "8", "--output", str(out)])
    saved = json.loads((out / "eval.json").read_text())
    assert saved["suites"].keys() == {"actions", "dbbench", "general"}
    assert saved["suites"]["actions"]["tasks"].keys() == {"alfworld", "db", "kg", "mind2web", "os", "webshop"}
    assert saved["suites"]["dbbench"]["episodes"] == 2 and saved["meta"]["dbbench_items"] == 2
    assert saved["suites"]["general"]["mmlu"]["items"] == 2
    assert saved["meta"]["timing"]["actions"]["turns"] == saved["suites"]["actions"]["overall"]["scored_turns"]
    assert results["suites"]["actions"]["overall"] == saved["suites"]["actions"]["overall"]
    md = (out / "eval.md").read_text()
    assert "on SQLite in memory)" in md
    assert "| os | 1 |" in md and "84.0 (not comparable)" in md  # ALFWorld's published 7B number, labelled
    assert "not comparable: the model is not a Llama-2-7B fine-tune; 2 items" in md


@pytest.fixture
def no_loading(monkeypatch):
    refuse_loading(monkeypatch, evaluate, "load_model")


def test_user_errors_before_loading(tiny_hf_dir, tmp_path, no_loading):
    assert error_line(evaluate.main, ["--model", "/nonexistent", "--suite", "dbbench"]).startswith(
        "error: --model /nonexistent: does not exist")
    assert error_line(evaluate.main, ["--model", tiny_hf_dir, "--suite", "dbbench", "--db-items", "/no/items.jsonl"]) \
        == "error: --db-items /no/items.jsonl: does not exist"
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"description": "q"}\n')
    assert error_line(evaluate.main, ["--model", tiny_hf_dir, "--suite", "dbbench", "--db-items", str(bad)]) == \
        f"error: {bad}:1: no 'table' field"
    assert "--data /no/data: not a directory; give a data_pipeline output directory" in error_line(
        evaluate.main, ["--model", tiny_hf_dir, "--suite", "actions", "--data", "/no/data"])
    assert f"--data {tmp_path}: no validation-*-of-*.tfrecord shards" in error_line(
        evaluate.main, ["--model", tiny_hf_dir, "--suite", "actions", "--data", str(tmp_path)])
    (tmp_path / "validation-00000-of-00001.tfrecord").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    message = error_line(evaluate.main, ["--model", tiny_hf_dir, "--suite", "actions", "--data", str(tmp_path)])
    assert f"--data {tmp_path}: " in message and "validation-00000-of-00001.tfrecord" in message


def test_bad_suite_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--model", "x", "--suite", "actions,chess"])
    assert exit_.value.code == 2 and "unknown suite chess" in capsys.readouterr().err
