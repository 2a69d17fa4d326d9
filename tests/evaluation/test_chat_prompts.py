"""dbbench and general prompts are rendered in the template the data was built with: a history's prompt is
exactly the training encoding of that history up to where the next answer's loss begins."""

from __future__ import annotations

import pytest

from agentlm_jax.errors import ConfigError
from agentlm_jax.evaluation.actions import loss_runs
from agentlm_jax.evaluation.lm import LM, data_template_of
from data_pipeline.formats.chat_template import Pair, encode_conversation

HISTORY = [("Count the rows of `Orchard Harvest`.", "Action: Operation\n```sql\nSELECT COUNT(*) FROM t\n```"),
           ("[(5,)]", 'Action: Answer\nFinal Answer: ["5"]')]
SYSTEM = "You are a helpful, respectful and honest assistant."


def _messages():
    (u1, a1), (u2, _) = HISTORY
    return [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]


def _prompt_before_last_answer(encoded):
    start = loss_runs(encoded.loss_mask)[-1][0]
    return list(encoded.input_ids[:start])


def test_llama2_prompts_are_the_training_encoding(tiny_model, tokenizer):
    lm = LM(tiny_model, tokenizer, data_template=data_template_of({"chat_template": {"name": "llama2"},
                                                                   "config": {"system_prompt": SYSTEM}}))
    assert lm.chat_template == "llama2" and lm.system_prompt == SYSTEM
    encoded = encode_conversation([Pair(u, a) for u, a in HISTORY], tokenizer, system_prompt=SYSTEM)
    assert lm.chat_prompt(_messages()) == _prompt_before_last_answer(encoded)


def test_jinja_prompts_are_the_training_encoding(tiny_model, tmp_path):
    from data_pipeline.formats.hf_template import TemplateEncoder, TemplateSpec
    from tests.data_pipeline.hf_fixtures import load, make_tokenizer_dir, template_text

    text = template_text("llama3.jinja")
    tokenizer = load(make_tokenizer_dir(tmp_path / "tok", "{{ 'not the training template' }}"))
    manifest = {"chat_template": {"name": "hf", "text": text}, "config": {"system_prompt": SYSTEM}}
    lm = LM(tiny_model, tokenizer, data_template=data_template_of(manifest))
    assert lm.chat_template == "hf"
    encoded = TemplateEncoder(tokenizer, TemplateSpec("hf", "test", text)).encode(
        [Pair(u, a) for u, a in HISTORY], SYSTEM)
    assert lm.chat_prompt(_messages()) == _prompt_before_last_answer(encoded)


def test_a_manifest_template_without_text_is_refused():
    with pytest.raises(ConfigError, match="data/x/manifest.json: chat_template 'hf' has no text"):
        data_template_of({"chat_template": {"name": "hf", "text": None}}, "data/x/manifest.json")
