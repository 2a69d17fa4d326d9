"""Suite `general`: letter log-likelihoods equal an unpadded full forward pass; scoring of MMLU letters and
GSM8K final numbers; bad files are named with their line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentlm_jax.errors import ConfigError
from agentlm_jax.evaluation import general


@pytest.mark.parametrize("text, number", [
    ("so 21 - 15 = 6.\n#### 6", 6.0), ("#### 1,234", 1234.0), ("It is 3, then 4.5", 4.5), ("#### -7", -7.0),
    ("no number", None), ("The answer is 12.", 12.0),
])
def test_final_number(text, number):
    assert general.final_number(text) == number


def test_letter_logprobs_equal_an_unpadded_forward_pass(tiny_lm, tiny_model):
    items, _ = general.load_mmlu()
    prompts = [tiny_lm.chat_prompt([{"role": "user", "content": general.mmlu_prompt(it)}]) for it in items[:5]]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    letters = general.letter_ids(tiny_lm.tokenizer)
    assert len(set(letters)) == 4
    got = tiny_lm.next_token_logprobs(prompts, letters)
    for row, prompt in zip(got, prompts):
        t = jnp.asarray([prompt], jnp.int32)
        logits = tiny_model(t, jnp.arange(len(prompt))[None], jnp.ones_like(t))
        expected = np.asarray(jax.nn.log_softmax(logits[0, -1]))[letters]
        np.testing.assert_allclose(row, expected, atol=1e-4)


class _Scripted:
    """An LM stand-in: log-probabilities and completions chosen by the test."""

    def __init__(self, tokenizer, *, letter=None, completion=None):
        self.tokenizer, self.letter, self.completion = tokenizer, letter, completion
        self.prompts = []

    def chat_prompt(self, messages):
        self.prompts.append(messages[-1]["content"])
        return [len(self.prompts) - 1]

    def next_token_logprobs(self, prompts, candidates):
        rows = np.full((len(prompts), 4), -5.0)
        for i, p in enumerate(prompts):
            rows[i, general.LETTERS.index(self.letter(p[0]))] = -0.1
        return rows

    def complete(self, prompts, max_new_tokens):
        return [[p[0]] for p in prompts]

    def decode(self, ids):
        return self.completion(ids[0])


def test_mmlu_scores_the_most_likely_letter(tokenizer):
    items, _ = general.load_mmlu()
    right = _Scripted(tokenizer, letter=lambda i: items[i]["answer"])
    assert general.evaluate_mmlu(right, items)["accuracy"] == 1.0
    assert "A. " in right.prompts[0] and "Answer with the letter" in right.prompts[0]
    wrong = _Scripted(tokenizer, letter=lambda i: "A" if items[i]["answer"] != "A" else "B")
    assert general.evaluate_mmlu(wrong, items)["accuracy"] == 0.0


def test_gsm8k_exact_match_on_the_final_number(tokenizer):
    items, _ = general.load_gsm8k()
    right = _Scripted(tokenizer, completion=lambda i: f"Step by step... #### {items[i]['gold']:g}")
    assert general.evaluate_gsm8k(right, items)["accuracy"] == 1.0
    off = _Scripted(tokenizer, completion=lambda i: f"#### {items[i]['gold'] + 1:g}")
    result = general.evaluate_gsm8k(off, items)
    assert result["accuracy"] == 0.0 and result["no_number_rate"] == 0.0
    mute = general.evaluate_gsm8k(_Scripted(tokenizer, completion=lambda i: "I do not know"), items)
    assert mute["no_number_rate"] == 1.0


def test_bad_files_are_named(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c"], "answer": "A"}) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: 'choices' must be a list of 4 strings"):
        general.load_mmlu(str(path))
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: 'answer' must be one of A, B, C, D"):
        general.load_mmlu(str(path))
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "q", "answer": "42"}) + "\n")
    with pytest.raises(ConfigError, match=rf"{gsm}:1: the answer has no '#### <number>' line"):
        general.load_gsm8k(str(gsm))
