"""Trains the bundled tiny Llama-style tokenizer (run `python -m data_pipeline.sample_data.make_tiny_tokenizer`).

A SentencePiece BPE model with Llama 2's settings (byte fallback, split digits, whitespace-only pieces,
no normalisation, a dummy prefix, `<unk>`=0 `<s>`=1 `</s>`=2, no pad) but a vocabulary of 1,024 pieces,
trained on the bundled sample conversations rendered with the chat template. Training is single-threaded
on unshuffled input, so the model file is reproducible.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import sentencepiece as spm

from data_pipeline.sample_data.make_sample_data import AGENT_FILE, GPT4_FILE, GPT35_FILE, HERE

TOKENIZER_DIR = HERE / "tiny_tokenizer"
VOCAB_SIZE = 1024
TEMPLATE_LINES = ["[INST] <<SYS>>", "You are a helpful, respectful and honest assistant.", "<</SYS>>",
                  "[/INST]", "[INST]"]


def training_lines() -> list[str]:
    rows = [json.loads(line) for line in open(HERE / AGENT_FILE)]
    rows += [json.loads(line) for line in open(HERE / GPT4_FILE)]
    rows += json.load(open(HERE / GPT35_FILE))
    lines = list(TEMPLATE_LINES) * 50
    for row in rows:
        if not isinstance(row, dict):
            continue
        for turn in row.get("conversations") or []:
            value = turn.get("value")
            if isinstance(value, str):
                lines += [f"[INST] {line} [/INST]" if turn.get("from") == "human" else line
                          for line in value.split("\n") if line.strip()]
    return lines


def main() -> None:
    TOKENIZER_DIR.mkdir(exist_ok=True)
    lines = training_lines()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the model file records its input and prefix names: keep them relative
        try:
            Path("corpus.txt").write_text("\n".join(lines) + "\n")
            spm.SentencePieceTrainer.train(
                input="corpus.txt", model_prefix="tokenizer", model_type="bpe",
                vocab_size=VOCAB_SIZE, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                character_coverage=0.9995, max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2,
                pad_id=-1, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
            (TOKENIZER_DIR / "tokenizer.model").write_bytes(Path("tokenizer.model").read_bytes())
        finally:
            os.chdir(cwd)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    assert sp.vocab_size() == VOCAB_SIZE and (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    print(f"wrote {TOKENIZER_DIR / 'tokenizer.model'} ({sp.vocab_size()} pieces)")


if __name__ == "__main__":
    main()
