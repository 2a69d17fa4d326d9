"""The chat template and loss mask against SentencePiece's own encoder (the reference we did not write).

Every test runs on the bundled tiny tokenizer and, when AGENTLM_LLAMA2_TOKENIZER is set, on the real
Llama 2 tokenizer.
"""

import json
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from data_pipeline.formats import chat_template as ct
from data_pipeline.sample_data import make_sample_data as sample
from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer

TRICKY = [
    "plain text", "  leading and trailing  ", "runs   of    spaces\n\n\n   indented\n\tcode", "</s> <s> [INST] [/INST]",
    "<<SYS>>\nfake system\n<</SYS>>", "digits 1234567890 and 3.14159", "unicode: é ü ß 漢字 🙂 ‽", "<unk> <0x0A>",
    "line\r\nwindows", "trailing newline\n", "```python\nprint('hi')\n```",
]


@pytest.fixture(scope="module", params=["tiny", "llama2"])
def tok(request):
    path = SAMPLE_TOKENIZER_DIR if request.param == "tiny" else request.getfixturevalue("llama2_tokenizer_path")
    tokenizer = load_tokenizer(path)
    tokenizer.sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    return tokenizer


def sample_pairs() -> list[list[ct.Pair]]:
    rows = [json.loads(line) for line in open(sample.HERE / sample.AGENT_FILE)]
    rows += [json.loads(line) for line in open(sample.HERE / sample.GPT4_FILE)]
    convs = []
    for row in rows:
        turns = row["conversations"]
        convs.append([ct.Pair(u["value"], a["value"], a.get("loss") is not False)
                      for u, a in zip(turns[::2], turns[1::2])])
    convs += [[ct.Pair(a, b)] for a in TRICKY for b in TRICKY]
    return convs


def reference_ids(sp, pairs, system_prompt=ct.DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """BOS + SentencePiece's encoding of each rendered block + EOS, block after block."""
    ids = []
    for i, pair in enumerate(pairs):
        text, _ = ct.render_block(pair, system_prompt if i == 0 else None)
        ids += [sp.bos_id(), *sp.encode(text), sp.eos_id()]
    return ids


def test_rendered_text_is_the_llama2_chat_template():
    pairs = [ct.Pair(" Hi ", "Hello!\n"), ct.Pair("Bye", " See you ")]
    text = "".join(ct.render_block(p, "SYS" if i == 0 else None)[0] for i, p in enumerate(pairs))
    assert text == "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST] Hello! [INST] Bye [/INST] See you "
    assert ct.render_block(pairs[0], None)[0] == "[INST] Hi [/INST] Hello! "


def test_token_ids_equal_sentencepiece_per_block(tok):
    encoder = ct.ChatEncoder(tok)
    convs = sample_pairs()
    encoded = encoder.encode_batch([(pairs, ct.DEFAULT_SYSTEM_PROMPT) for pairs in convs])
    for pairs, enc in zip(convs, encoded):
        assert enc.input_ids.tolist() == reference_ids(tok.sp, pairs), pairs


def test_token_ids_equal_sentencepiece_on_real_sharegpt(tok, sharegpt_sample_path):
    convs = []
    for line in open(sharegpt_sample_path):
        turns = [t for t in json.loads(line)["conversations"] if isinstance(t.get("value"), str)]
        pairs = [ct.Pair(u["value"], a["value"]) for u, a in zip(turns[::2], turns[1::2])]
        if pairs:
            convs.append(pairs)
    encoded = ct.ChatEncoder(tok).encode_batch([(p, ct.DEFAULT_SYSTEM_PROMPT) for p in convs])
    mismatched = [i for i, (p, e) in enumerate(zip(convs, encoded))
                  if e.input_ids.tolist() != reference_ids(tok.sp, p)]
    assert not mismatched, f"{len(mismatched)} of {len(convs)} conversations differ, first {mismatched[:5]}"


def test_loss_mask_covers_exactly_the_trained_answers(tok):
    encoder = ct.ChatEncoder(tok)
    convs = [p for p in sample_pairs() if any(not x.loss for x in p)][:20] + sample_pairs()[-30:]
    assert any(not x.loss for p in convs for x in p)
    for pairs, enc in zip(convs, encoder.encode_batch([(p, "Be brief.") for p in convs])):
        ids, mask = enc.input_ids, enc.loss_mask
        # Blocks are delimited by the BOS ids inserted by us (text never produces them).
        starts = np.flatnonzero(ids == tok.bos_token_id)
        assert len(starts) == len(pairs)
        for pair, block_ids, block_mask in zip(pairs, np.split(ids, starts[1:]), np.split(mask, starts[1:])):
            assert block_ids[-1] == tok.eos_token_id and (block_ids == tok.eos_token_id).sum() == 1
            if not pair.loss:
                assert not block_mask.any()
                continue
            # the answer's tokens then </s>: one contiguous run at the end of the block
            run = np.flatnonzero(block_mask)
            assert run[-1] == len(block_ids) - 1 and np.all(np.diff(run) == 1)
            answer = tok.sp.decode(block_ids[run[:-1]].tolist())
            assert answer.strip() == pair.assistant.strip()
            prompt = tok.sp.decode(block_ids[1:run[0]].tolist())
            assert prompt.strip().endswith(ct.E_INST) and pair.assistant.strip() not in prompt[-5:]


def test_loss_tokens_decode_to_answers_only(tok):
    pairs = [ct.Pair("What is 2+2?", "It is 4."), ct.Pair("demo question", "demo answer", loss=False),
             ct.Pair("Say </s> please", "Here: </s> [INST]")]
    enc = ct.encode_conversation(pairs, tok, system_prompt="SYSTEM PROMPT")
    decoded = tok.decode(enc.input_ids[enc.loss_mask == 1].tolist())
    assert decoded.replace(" ", "") == "Itis4.</s>Here:</s>[INST]</s>"
    assert (enc.input_ids == tok.eos_token_id).sum() == 3  # the "</s>" typed by the user is plain text
    assert (enc.input_ids == tok.bos_token_id).sum() == 3


def test_overlong_conversations_drop_whole_trailing_pairs(tok):
    pairs = [ct.Pair(f"question {i}", f"answer number {i} " * 5) for i in range(6)]
    full = ct.encode_conversation(pairs, tok)
    block_ends = np.flatnonzero(full.input_ids == tok.eos_token_id) + 1
    limit = int(block_ends[2]) + 3  # room for three pairs and a bit of the fourth
    cut = ct.encode_conversation(pairs, tok, max_seq_len=limit)
    assert (cut.pairs_kept, cut.pairs_dropped) == (3, 3)
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:block_ends[2]])
    np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[:block_ends[2]])
    assert ct.encode_conversation(pairs, tok, max_seq_len=int(block_ends[0]) - 1) == ct.FIRST_PAIR_TOO_LONG
    demo_first = [ct.Pair("q", "demo", loss=False)] + pairs
    first_end = int(np.flatnonzero(ct.encode_conversation(demo_first, tok).input_ids == tok.eos_token_id)[0]) + 1
    assert ct.encode_conversation(demo_first, tok, max_seq_len=first_end + 2) == ct.NO_LOSS_AFTER_TRUNCATION


def test_generation_prompt_is_the_training_prefix(tok):
    history = [ct.Pair("first </s> question", "first answer"), ct.Pair("second", "second answer")]
    final = "the final question"
    messages = [m for p in history for m in ({"role": "user", "content": p.user},
                                              {"role": "assistant", "content": p.assistant})]
    messages.append({"role": "user", "content": final})
    prompt = ct.encode_generation_prompt(messages, tok, system_prompt="SYS")
    train = ct.encode_conversation(history + [ct.Pair(final, "the answer")], tok, system_prompt="SYS")
    assert prompt == train.input_ids[:len(prompt)].tolist()
    assert train.loss_mask[len(prompt) - 1] == 0 and train.loss_mask[len(prompt)] == 1  # answer starts next
    single = ct.encode_generation_prompt([{"role": "user", "content": "hi"}], tok)
    assert single == [tok.bos_token_id] + tok.sp.encode(ct.render_generation_prompt("hi", ct.DEFAULT_SYSTEM_PROMPT))
    with pytest.raises(ValueError, match="alternate"):
        ct.encode_generation_prompt([{"role": "assistant", "content": "x"}], tok)


def test_load_tokenizer_is_the_tiny_llama_style_model():
    tok = load_tokenizer(SAMPLE_TOKENIZER_DIR)
    assert tok.is_fast and len(tok) == 1024
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(tok("\x07", add_special_tokens=False).input_ids)[-1] == "<0x07>"  # bytes


def test_load_tokenizer_ignores_a_class_config_next_to_the_model(tmp_path):
    shutil.copy(os.path.join(SAMPLE_TOKENIZER_DIR, "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "legacy": false}')
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "   public static\n    void main"
    assert load_tokenizer(str(tmp_path))(text, add_special_tokens=False).input_ids == sp.encode(text)


def test_load_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer("./does/not/exist")
    with pytest.raises(RuntimeError, match="Hugging Face hub.*--tokenizer"):
        load_tokenizer("meta-llama/Llama-2-7b-hf")  # tests run with HF_HUB_OFFLINE=1


def test_special_token_text_is_plain_text_in_training_but_a_token_for_a_hf_client(tok):
    encoder = ct.ChatEncoder(tok)
    for special in ("</s>", "<s>", "<unk>"):
        text = f"the end {special} then more"
        assert encoder.special_token_text(text) == special
        assert tok.convert_tokens_to_ids(special) in tok.encode(text, add_special_tokens=False)  # what a client sees
        assert tok.convert_tokens_to_ids(special) not in encoder.encode_texts([text])[0].ids  # what training sees
    assert encoder.special_token_text("no <special> tokens </S> [INST] here") is None


class Spy:
    """Records the length of every text handed to the tokenizer."""

    def __init__(self, encoder):
        self.lengths, self.real = [], encoder.encode_texts
        encoder.encode_texts = self

    def __call__(self, texts):
        self.lengths += [len(t) for t in texts]
        return self.real(texts)


def test_blocks_that_cannot_fit_are_never_tokenized(tok):
    encoder = ct.ChatEncoder(tok, max_seq_len=256)
    assert encoder.max_chars_per_token  # (provable for Llama-2-style tokenizers)
    spy = Spy(encoder)
    huge = "word " * 2_000_000  # 10 MB: tokenizing it whole costs seconds and gigabytes
    assert encoder.encode_batch([([ct.Pair("q", huge)], None)]) == [ct.FIRST_PAIR_TOO_LONG]
    short_then_huge = encoder.encode_batch([([ct.Pair("q", "a"), ct.Pair(huge, "b"), ct.Pair("c", "d")], None)])[0]
    assert (short_then_huge.pairs_kept, short_then_huge.pairs_dropped) == (1, 2)
    many = encoder.encode_batch([([ct.Pair(f"q{i}", f"a{i}") for i in range(100_000)], None)])[0]
    assert many.pairs_kept + many.pairs_dropped == 100_000
    assert max(spy.lengths) < 256 * encoder.max_chars_per_token and len(spy.lengths) < 256
    # the bound only skips what could not fit: the same results as tokenizing everything
    convs = [([ct.Pair(f"question {i}", "answer " * (n + i)) for i in range(4)], None) for n in range(0, 200, 7)]
    unbounded = ct.ChatEncoder(tok, max_seq_len=256)
    unbounded.max_chars_per_token = None
    assert encoder.encode_batch(convs) == unbounded.encode_batch(convs)
