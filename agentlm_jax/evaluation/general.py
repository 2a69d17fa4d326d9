"""Suite `general`: multiple-choice accuracy (MMLU format) by answer-letter likelihood, and GSM8K-format exact
match on the final number. Zero-shot; the prompts (in the training chat template, as a user turn):

    MMLU   "The following is a multiple choice question{about SUBJECT}.\\n\\n{question}\\nA. {a}\\nB. {b}\\n
            C. {c}\\nD. {d}\\n\\nAnswer with the letter of the correct option."
           scored by which of the tokens "A" "B" "C" "D" is most likely as the first answer token.
    GSM8K  "{question}\\n\\nSolve the problem step by step. End with the final answer as '#### <number>'."
           greedy; the number after the last "####", else the last number in the answer, equals the gold
           number (the one after "####" in the reference answer).

Files are JSONL. MMLU: {"question", "choices": [4 strings], "answer": "A".."D" (or 0..3), "subject"?}.
GSM8K: {"question", "answer": "... #### 42"}.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Sequence

from agentlm_jax.errors import ConfigError, MissingInputError

LETTERS = ("A", "B", "C", "D")
SAMPLE_MMLU = "sample_data/mmlu.jsonl"
SAMPLE_GSM8K = "sample_data/gsm8k.jsonl"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _read_jsonl(path: str | None, sample: str, flag: str) -> tuple[list[tuple[str, dict]], str]:
    if path is None:
        text = resources.files("agentlm_jax.evaluation").joinpath(sample).read_text(encoding="utf-8")
        source = f"agentlm_jax/evaluation/{sample}"
    else:
        import fsspec

        try:
            with fsspec.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise MissingInputError(f"{flag} {path}: does not exist") from None
        source = path
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{source}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}:{n}: not JSON ({e.msg})") from None
    if not rows:
        raise ConfigError(f"{source}: no items")
    return rows, source


def load_mmlu(path: str | None = None, limit: int | None = None) -> tuple[list[dict], str]:
    rows, source = _read_jsonl(path, SAMPLE_MMLU, "--mmlu")
    items = []
    for where, raw in rows[:limit]:
        if not isinstance(raw, dict) or not isinstance(raw.get("question"), str):
            raise ConfigError(f"{where}: needs a 'question' string")
        choices = raw.get("choices")
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
            raise ConfigError(f"{where}: 'choices' must be a list of 4 strings")
        answer = raw.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
            answer = LETTERS[answer]
        if answer not in LETTERS:
            raise ConfigError(f"{where}: 'answer' must be one of A, B, C, D (or 0-3), got {answer!r}")
        items.append({"question": raw["question"], "choices": choices, "answer": answer,
                      "subject": raw.get("subject")})
    return items, source


def load_gsm8k(path: str | None = None, limit: int | None = None) -> tuple[list[dict], str]:
    rows, source = _read_jsonl(path, SAMPLE_GSM8K, "--gsm8k")
    items = []
    for where, raw in rows[:limit]:
        if not isinstance(raw, dict) or not isinstance(raw.get("question"), str) or not isinstance(
                raw.get("answer"), str):
            raise ConfigError(f"{where}: needs 'question' and 'answer' strings")
        if "####" not in raw["answer"]:
            raise ConfigError(f"{where}: the answer has no '#### <number>' line")
        gold = final_number(raw["answer"])
        if gold is None:
            raise ConfigError(f"{where}: no number after '####' in the answer")
        items.append({"question": raw["question"], "gold": gold})
    return items, source


def mmlu_prompt(item: dict) -> str:
    about = f" about {item['subject'].replace('_', ' ')}" if item.get("subject") else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, item["choices"]))
    return (f"The following is a multiple choice question{about}.\n\n{item['question']}\n{options}\n\n"
            "Answer with the letter of the correct option.")


def gsm8k_prompt(item: dict) -> str:
    return f"{item['question']}\n\nSolve the problem step by step. End with the final answer as '#### <number>'."


def final_number(text: str) -> float | None:
    """The number after the last '####', else the last number of the text; None if there is none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail) if "####" in text else _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    try:
        return float(value.replace(",", "").rstrip("."))
    except ValueError:
        return None


def letter_ids(tokenizer) -> list[int]:
    """The token each letter's answer starts with (what follows the template's answer space)."""
    ids = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    if any(not i for i in ids):
        raise ConfigError("the tokenizer encodes an answer letter as nothing")
    return [i[-1] for i in ids]


def evaluate_mmlu(lm, items: Sequence[dict]) -> dict:
    prompts = [lm.chat_prompt([{"role": "user", "content": mmlu_prompt(it)}]) for it in items]
    logp = lm.next_token_logprobs(prompts, letter_ids(lm.tokenizer))
    picks = [LETTERS[int(row.argmax())] for row in logp]
    correct = sum(p == it["answer"] for p, it in zip(picks, items))
    return {"items": len(items), "correct": correct, "accuracy": correct / len(items) if items else None,
            "predictions": picks[:20]}


def evaluate_gsm8k(lm, items: Sequence[dict], *, max_new_tokens: int = 256) -> dict:
    prompts = [lm.chat_prompt([{"role": "user", "content": gsm8k_prompt(it)}]) for it in items]
    outs = lm.complete(prompts, max_new_tokens=max_new_tokens)
    got = [final_number(lm.decode(o)) for o in outs]
    correct = sum(g is not None and abs(g - it["gold"]) < 1e-6 for g, it in zip(got, items))
    return {"items": len(items), "correct": correct, "accuracy": correct / len(items) if items else None,
            "no_number_rate": sum(g is None for g in got) / len(items) if items else None}
