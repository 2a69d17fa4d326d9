"""Agent data as people bring it in 2026: OpenAI `messages` with tool calls and ShareGPT with tool turns
(LLaMA-Factory), into one internal conversation, rendered by the Llama 2 template (tools as text) or any
Jinja template (checked against transformers' own `apply_chat_template(messages, tools=...)`)."""

import copy
import json
import os
import subprocess
import sys

import pytest

from data_pipeline.formats import hf_template as ht
from data_pipeline.formats.chat_template import ChatEncoder, Pair, ToolCall, ToolResult
from data_pipeline.normalize import REJECTED, Conversation, normalize
from data_pipeline.sample_data import make_sample_data as sample
from data_pipeline.sources import RawItem
from tests.data_pipeline import hf_fixtures as fx

THRESHOLDS = {"default": 1.0}


def run(record, record_format="auto"):
    return normalize(RawItem(record, "/data/tools.jsonl", 3, 0), "src", "general", lambda task: 1.0, record_format)


def sample_records(name):
    path = sample.HERE / name
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


WEATHER = {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_weather", {"city": "Oslo"}),
                                                                call("c2", "get_weather", {"city": "Rome"})]}
OPENAI = {"id": "r1", "tools": sample.TOOLS, "messages": [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "weight": 0},
    {"role": "user", "content": [{"type": "text", "text": "Oslo or "}, {"type": "text", "text": "Rome?"}]},
    WEATHER,
    {"role": "tool", "tool_call_id": "c1", "content": "3 C"}, {"role": "tool", "tool_call_id": "c2", "content": "18 C"},
    {"role": "assistant", "content": "Rome is warmer."}]}


def test_openai_messages_become_one_conversation_without_loss_of_information():
    conv, repairs = run(OPENAI)
    assert isinstance(conv, Conversation) and repairs == ("system_prompt_from_record",)
    assert conv.system == "Use tools." and conv.tools == tuple(sample.TOOLS)
    assert conv.pairs == (
        Pair("Hi", "Hello!", loss=False),
        Pair("Oslo or Rome?", "", tool_calls=(ToolCall("get_weather", {"city": "Oslo"}, "c1"),
                                               ToolCall("get_weather", {"city": "Rome"}, "c2"))),
        Pair("", "Rome is warmer.", tool_results=(ToolResult("3 C", "c1"), ToolResult("18 C", "c2"))))


def test_sharegpt_tool_turns_mean_the_same_as_openai_tool_calls():
    sharegpt = {"id": "s1", "tools": json.dumps(sample.TOOLS[:1]), "conversations": [
        {"from": "human", "value": "Coat in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "3 C"}, {"from": "gpt", "value": "Yes, take a coat."}]}
    openai = {"id": "s1", "tools": sample.TOOLS[:1], "messages": [
        {"role": "user", "content": "Coat in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "3 C"}, {"role": "assistant", "content": "Yes, take a coat."}]}
    a, b = run(sharegpt)[0], run(openai)[0]
    assert isinstance(a, Conversation) and (a.pairs, a.tools) == (b.pairs, b.tools)
    assert a.pairs[0].tool_calls == (ToolCall("get_weather", {"city": "Oslo"}),)


def bad(messages, **record):
    return {"id": "x", "messages": messages, **record}


U, A = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}


@pytest.mark.parametrize("record,reason,detail", [
    (bad([U, {"role": "tool", "content": "r"}, A]), "tool_result_without_call", "turn 1: a tool message"),
    (bad([U, WEATHER, {"role": "tool", "tool_call_id": "c9", "content": "r"}, A]), "tool_result_without_call",
     "tool_call_id 'c9' matches no call"),
    (bad([U, WEATHER, {"role": "tool", "tool_call_id": "c1", "content": "r"},
          {"role": "tool", "tool_call_id": "c1", "content": "r"}, A]), "tool_result_without_call", "already has"),
    (bad([U, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
          {"role": "tool", "content": "r"}, {"role": "tool", "content": "r2"}, A]),
     "tool_result_without_call", "more tool results than the 1 call"),
    (bad([U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{city: Oslo"}}]}, A]),
     "invalid_tool_arguments", "not valid JSON"),
    (bad([U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}, A]),
     "invalid_tool_arguments", "not a JSON object"),
    (bad([U, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"arguments": "{}"}}]}]),
     "bad_tool_call", "needs"),
    (bad([{**U, "tool_calls": [call("c1", "f", {})]}, A]), "bad_tool_call", "only assistant"),
    (bad([U, {"role": "critic", "content": "x"}, A]), "unknown_role", "turn 1: 'critic'"),
    (bad([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}, A]),
     "unsupported_content_part", "'image_url'"),
    (bad([{"role": "user", "content": ["plain string part"]}, A]), "unsupported_content_part", "'str'"),
    (bad([U, {**A, "weight": 0.5}]), "bad_loss_flag", "weight 0.5"),
    (bad([U, A], tools="{not json"), "bad_tools", "not valid JSON"),
    (bad([U, A], tools=[{"type": "function"}, "f"]), "bad_tools", "list of JSON objects"),
    ({"id": "x", "conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "get_w("}]},
     "invalid_tool_arguments", "function_call is not valid JSON"),
])
def test_bad_tool_data_is_rejected_with_its_reason(record, reason, detail):
    result, _ = run(record)
    assert result.bucket == REJECTED and result.reason == reason and detail in result.detail, result


def test_weight_zero_turns_and_tool_results_carry_no_loss_in_the_llama2_template():
    tok = fx.load(fx.make_tokenizer_dir_cached("llama3.jinja"))  # (any tokenizer with BOS and EOS)
    conv = run(OPENAI)[0]
    encoder = ChatEncoder(tok)
    enc = encoder.encode_batch([(conv.pairs, conv.system, conv.tools)])[0]
    spans = [tok.decode(enc.ids[a:b]) for a, b in ht._runs(enc.mask)]
    calls = "\n".join(json.dumps({"name": "get_weather", "arguments": {"city": c}}) for c in ("Oslo", "Rome"))
    assert [s.replace(tok.eos_token, "").strip() for s in spans] == [calls, "Rome is warmer."]
    text = tok.decode(enc.ids)
    assert "3 C\n\n18 C" in text and '"name": "convert_currency"' in text  # results as user text, tools in <<SYS>>


@pytest.mark.parametrize("style", ["chatml.jinja", "llama3.jinja"])
def test_jinja_templates_render_tool_records_as_transformers_does(style):
    """The ids equal transformers' apply_chat_template of the original messages (arguments as objects, as
    Hugging Face templates take them) with `tools`; the loss covers exactly the trained answers."""
    tok = fx.load(fx.make_tokenizer_dir_cached(style))
    encoder = ht.TemplateEncoder(tok, ht.TemplateSpec(style, style, fx.template_text(style)))
    eot = "<|im_end|>" if style == "chatml.jinja" else "<|eot_id|>"
    checked = 0
    for record in [OPENAI] + [r for r in sample_records(sample.OPENAI_TOOLS_FILE) if not r["id"].startswith("bad")]:
        conv = run(record)[0]
        enc = encoder.encode(list(conv.pairs), conv.system, conv.tools)
        messages = copy.deepcopy(record["messages"])
        for m in messages:
            m.pop("weight", None)
            if isinstance(m["content"], list):
                m["content"] = "".join(part["text"] for part in m["content"])
            m["content"] = m["content"] or ""
            for c in m.get("tool_calls") or ():
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        assert enc.ids == tok.apply_chat_template(messages, tools=record["tools"], tokenize=True, return_dict=False)
        spans = [tok.decode(enc.ids[a:b]) for a, b in ht._runs(enc.mask)]
        trained = [m for m in record["messages"] if m["role"] == "assistant" and m.get("weight", 1)]
        assert len(spans) == len(trained)
        for span, m in zip(spans, trained):
            assert span.endswith(eot) and "assistant" not in span.split("\n")[0]
            assert (m["content"] or "").strip() in span
            for c in m.get("tool_calls") or ():
                assert f'"name": "{c["function"]["name"]}"' in span
            assert "<tool_response>" not in span and "ipython" not in span
        checked += 1
    assert checked == 33


def test_a_template_without_tool_syntax_rejects_tool_calls_instead_of_training_an_empty_answer():
    text_only = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + "
                 "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- endif %}")
    tok = fx.load(fx.make_tokenizer_dir_cached("chatml.jinja"))
    encoder = ht.TemplateEncoder(tok, ht.TemplateSpec("text_only", "test", text_only))
    conv = run(OPENAI)[0]
    result = encoder.encode(list(conv.pairs), conv.system, conv.tools)
    assert isinstance(result, ht.Rejection) and result.reason == ht.TEMPLATE_MISMATCH
    assert "lacks its content or the calls ['get_weather', 'get_weather']" in result.detail


def test_record_format_override_rejects_the_other_layout():
    sharegpt = {"id": "s", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert isinstance(run(sharegpt, "sharegpt")[0], Conversation)
    assert isinstance(run(OPENAI, "openai")[0], Conversation)
    result = run(sharegpt, "openai")[0]
    assert result.reason == "wrong_record_format" and "expected openai, the record is sharegpt" in result.detail


def test_build_of_the_bundled_tool_samples(tmp_path):
    """The embedded example: both tool formats through the pipeline, every record accounted for, each bad
    record rejected with its reason and written out, the kept ones in the shards."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--eta", "0", "--general-format", "auto",
                           "--general", f"{sample.HERE}/{sample.OPENAI_TOOLS_FILE}",
                           "--general", f"{sample.HERE}/{sample.SHAREGPT_TOOLS_FILE}", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.load(open(out / "manifest.json"))
    openai_src = manifest["sources"]["openai_tools_sample"]
    assert (openai_src["read"], openai_src["kept"], openai_src["rejected"]) == (37, 32, 5)
    assert openai_src["rejected_by_reason"] == {"invalid_tool_arguments": 1, "tool_result_without_call": 2,
                                                "unknown_role": 1, "unsupported_content_part": 1}
    assert manifest["sources"]["sharegpt_tools_sample"]["kept"] == 16
    rejected = [json.loads(line) for line in open(out / "rejected.jsonl")]
    assert sorted(r["record"]["id"] for r in rejected) == sorted(
        r["id"] for r in sample_records(sample.OPENAI_TOOLS_FILE) if r["id"].startswith("bad"))
    assert manifest["config"]["general"][0]["record_format"] == "auto"


SHAREGPT_ETA0_SHARDS_SHA256 = {  # ../shared's 2,000 ShareGPT conversations, --eta 0, as built before issue #12
    "train-00000-of-00004.tfrecord": "25beb71ad4d8b1b6642055eeeca2f270b3b6f5f7ec6ccaf0bb4212c3a568d7a0",
    "train-00001-of-00004.tfrecord": "5fd33b01bb6d34a4c88aba7d2aa369232a6e7cb56f730c85c68fa0cedb5408a6",
    "train-00002-of-00004.tfrecord": "4a4a85f01883a8cb1a9478ab6552d2c3dbfd2310e0f4273119f5e96439251cda",
    "train-00003-of-00004.tfrecord": "57ee8b3155c3a62da80da73d742e213c2fe18068f014b2b266c3250e6c6772ac",
    "validation-00000-of-00001.tfrecord": "9c7fd515c65ea9fff63fe3c2aa50567945a5186a1f032e4619623006c0fc38ce",
}


def test_llama2_shards_of_real_sharegpt_are_byte_identical_to_the_reference_build(sharegpt_sample_path, tmp_path):
    import hashlib

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--eta", "0", "--general",
                           str(sharegpt_sample_path), "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in SHAREGPT_ETA0_SHARDS_SHA256}
    assert got == SHAREGPT_ETA0_SHARDS_SHA256
