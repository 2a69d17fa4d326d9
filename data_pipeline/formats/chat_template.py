"""The Llama 2 chat template and the loss mask, as AgentLM was trained (docs/paper.md, "Training recipe").

A conversation is a list of (user, assistant) pairs. Each pair is its own block, tokenized whole:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {assistant_1} </s><s>[INST] {user_2} [/INST] ...

(the system prompt only inside the first `[INST]`; user, system and answer texts stripped of surrounding
whitespace, as Meta's `chat_completion` does). `<s>` and
`</s>` are inserted as ids, never parsed from text, so a user writing "</s>" or "[INST]" gets plain text
tokens. The loss mask is 1 on the tokens of the assistant's part of a block (` {answer} `, found through
the fast tokenizer's character offsets) and on the `</s>` that closes it, for pairs whose answer counts
(`loss`); 0 everywhere else (BOS, `[INST]`, system prompt, user text, `loss: false` demonstration turns).
A Hugging Face client, however, parses special-token text in a message as that token (`</s>` as EOS), so
the pipeline rejects records whose text holds any (`ChatEncoder.special_token_text`).

Conversations longer than `max_seq_len` keep whole leading pairs that fit; a trailing pair is never cut.
Blocks that cannot fit are never tokenized: a block of n characters has at least n / (the longest
vocabulary piece) tokens when the tokenizer's normalizer and pre-tokenizer never shorten text (Llama 2's:
`_max_chars_per_token`), so the work per conversation is bounded by `max_seq_len`, whatever its size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import weakref
from typing import Sequence

import numpy as np

DEFAULT_SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

log = logging.getLogger(__name__)

FIRST_PAIR_TOO_LONG = "first_pair_too_long"
NO_LOSS_AFTER_TRUNCATION = "no_loss_after_truncation"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A function call the assistant makes: OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`
    with `arguments` parsed from its JSON text (Hugging Face templates take it as an object)."""
    name: str
    arguments: dict
    id: str | None = None

    def message(self) -> dict:
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return ({"id": self.id} if self.id is not None else {}) | call

    def text(self) -> str:
        return json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """A tool message: the result of one call (an observation: never in the loss)."""
    content: str
    tool_call_id: str | None = None
    name: str | None = None

    def message(self) -> dict:
        return ({"role": "tool", "content": self.content}
                | ({"tool_call_id": self.tool_call_id} if self.tool_call_id is not None else {})
                | ({"name": self.name} if self.name is not None else {}))


@dataclasses.dataclass(frozen=True)
class Pair:
    """One exchange: what the assistant answers (the results of its previous tool calls, then the user's
    message; either may be absent, not both) and the answer (text and/or tool calls); `loss` says whether
    the answer is a training target."""
    user: str
    assistant: str
    loss: bool = True
    tool_calls: tuple[ToolCall, ...] = ()
    tool_results: tuple[ToolResult, ...] = ()

    @property
    def prompt_text(self) -> str:
        """The prompt side as one text (the Llama 2 template has no tool syntax): the tool results, then the
        user's message, separated by blank lines, as AgentInstruct writes observations as user turns."""
        if not self.tool_results:
            return self.user
        return "\n\n".join([r.content.strip() for r in self.tool_results] + ([self.user.strip()] if self.user.strip() else []))

    @property
    def answer_text(self) -> str:
        """The answer as one text: its content, then each tool call as a JSON line `{"name", "arguments"}`."""
        if not self.tool_calls:
            return self.assistant
        return "\n".join(([self.assistant.strip()] if self.assistant.strip() else []) + [c.text() for c in self.tool_calls])


def tools_system_prompt(system_prompt: str | None, tools: Sequence) -> str | None:
    """The Llama 2 template's system prompt for a record with tools: the prompt, then the tools' JSON schemas."""
    if not tools:
        return system_prompt
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    head = f"{system_prompt.strip()}\n\n" if system_prompt and system_prompt.strip() else ""
    return f"{head}You can call these tools (JSON schemas); write a call as a JSON line " \
           f'{{"name": ..., "arguments": {{...}}}}:\n{listing}'


@dataclasses.dataclass(frozen=True)
class Encoded:
    ids: list[int]  # the tokenized conversation (plain lists: what the record encoder consumes)
    mask: list[int]  # 0/1 loss mask, same length
    pairs_kept: int
    pairs_dropped: int  # trailing pairs dropped to fit max_seq_len

    @property
    def input_ids(self) -> np.ndarray:
        return np.asarray(self.ids, np.int32)

    @property
    def loss_mask(self) -> np.ndarray:
        return np.asarray(self.mask, np.int32)


def user_prompt(user: str, system_prompt: str | None) -> str:
    """The text between `[INST] ` and ` [/INST]`."""
    user = user.strip()
    return f"{B_SYS}{system_prompt.strip()}{E_SYS}{user}" if system_prompt else user


def render_block(pair: Pair, system_prompt: str | None) -> tuple[str, int]:
    """A pair's block text (without BOS/EOS) and the character index where the assistant's part begins."""
    prompt = f"{B_INST} {user_prompt(pair.prompt_text, system_prompt)} {E_INST}"
    return f"{prompt} {pair.answer_text.strip()} ", len(prompt)


def render_generation_prompt(user: str, system_prompt: str | None) -> str:
    return f"{B_INST} {user_prompt(user, system_prompt)} {E_INST}"


class ChatEncoder:
    """Tokenizes conversations block by block in one batched call of the fast tokenizer."""

    def __init__(self, tokenizer, max_seq_len: int | None = None):
        self._setup(*serialize_tokenizer(tokenizer), max_seq_len)

    @classmethod
    def from_serialized(cls, tokenizer_json: str, bos_id: int, eos_id: int,
                        max_seq_len: int | None = None) -> "ChatEncoder":
        """From the Rust tokenizer's JSON (`serialize_tokenizer`): no transformers import, as Beam workers want."""
        encoder = cls.__new__(cls)
        encoder._setup(tokenizer_json, bos_id, eos_id, max_seq_len)
        return encoder

    def _setup(self, tokenizer_json: str, bos_id: int, eos_id: int, max_seq_len: int | None) -> None:
        from tokenizers import Tokenizer

        self.bos_id, self.eos_id, self.max_seq_len = bos_id, eos_id, max_seq_len
        # A private copy that encodes special-token text ("</s>", "<s>") as plain text.
        self._backend = Tokenizer.from_str(tokenizer_json)
        self._backend.encode_special_tokens = True
        specials = sorted({t.content for t in self._backend.get_added_tokens_decoder().values() if t.special},
                          key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.max_chars_per_token = _max_chars_per_token(json.loads(tokenizer_json), self._backend)
        if self.max_chars_per_token is None and max_seq_len is not None:
            log.warning("this tokenizer's normalizer or model can shorten text, so overlong conversations "
                        "are tokenized whole before the max_seq_len check (no cheap length bound)")

    def special_token_text(self, text: str | None) -> str | None:
        """The first special-token text (e.g. `</s>`, `<s>`, `<unk>`) in `text`, or None."""
        found = self._specials.search(text) if text and self._specials else None
        return found[0] if found else None

    def encode_texts(self, texts: Sequence[str]) -> list:
        """`tokenizers.Encoding`s (ids and character offsets) of texts, no special tokens added."""
        return self._backend.encode_batch(list(texts), add_special_tokens=False)

    def encode_batch(self, conversations: Sequence[tuple]) -> list[Encoded | str]:
        """Encodes (pairs, system_prompt[, tools]) conversations; a filter reason string for those that cannot
        be. Tools (JSON schemas) go into the system prompt (`tools_system_prompt`)."""
        texts, starts, owners = [], [], []
        for c, (pairs, system_prompt, *tools) in enumerate(conversations):
            if tools and tools[0]:
                system_prompt = tools_system_prompt(system_prompt, tools[0])
            at_least = 0  # tokens the blocks so far have at least
            for i, pair in enumerate(pairs):
                text, start = render_block(pair, system_prompt if i == 0 else None)
                if self.max_seq_len is not None and self.max_chars_per_token is not None:
                    at_least += 2 + math.ceil(len(text) / self.max_chars_per_token)  # (+ BOS, EOS)
                    if at_least > self.max_seq_len:  # this block and the rest cannot fit: not tokenized
                        break
                texts.append(text)
                starts.append(start)
                owners.append(c)
        encodings = self.encode_texts(texts)
        blocks: list[list[tuple[list[int], list[int]]]] = [[] for _ in conversations]
        for encoding, start, c, in zip(encodings, starts, owners):
            pair = conversations[c][0][len(blocks[c])]
            blocks[c].append(self._block(encoding, start, pair.loss))
        return [self._join(b, len(conv[0])) for b, conv in zip(blocks, conversations)]

    def _block(self, encoding, answer_start: int, loss: bool) -> tuple[list[int], list[int]]:
        ids = [self.bos_id, *encoding.ids, self.eos_id]
        if not loss:
            return ids, [0] * len(ids)
        first = answer_token(encoding, answer_start)
        return ids, [0] * (first + 1) + [1] * (len(ids) - first - 1)

    def _join(self, blocks: list[tuple[list[int], list[int]]], pairs: int) -> Encoded | str:
        """The leading blocks that fit; `pairs`: the conversation's pair count (blocks may be fewer: those
        known not to fit were not tokenized)."""
        ids, mask, kept = [], [], 0
        for block_ids, block_mask in blocks:
            if self.max_seq_len is not None and len(ids) + len(block_ids) > self.max_seq_len:
                break
            ids += block_ids
            mask += block_mask
            kept += 1
        if kept == 0:
            return FIRST_PAIR_TOO_LONG
        if 1 not in mask:
            return NO_LOSS_AFTER_TRUNCATION
        return Encoded(ids, mask, kept, pairs - kept)


_NON_SHRINKING_NORMALIZERS = {"Prepend", "NFD", "NFKD", "Lowercase", "Sequence", "Replace"}
_NON_SHRINKING_PRE_TOKENIZERS = {"Metaspace", "ByteLevel", "Digits", "Punctuation", "UnicodeScripts", "Sequence"}


def _never_shortens(component: dict | None, allowed: set[str]) -> bool:
    """Whether a normalizer / pre-tokenizer (its JSON) can only keep or lengthen the text it is given."""
    if component is None:
        return True
    kind = component.get("type")
    if kind not in allowed:
        return False
    if kind == "Sequence":
        parts = component.get("normalizers", component.get("pretokenizers")) or []
        return all(_never_shortens(p, allowed) for p in parts)
    if kind == "Replace":  # a literal (a regex only when it is an anchored literal, e.g. Llama's `\A▁`)
        pattern = component["pattern"].get("String")
        if pattern is None:
            pattern = re.sub(r"^(\\A|\^)", "", component["pattern"].get("Regex", ""))
            if not pattern or re.escape(pattern) != pattern:
                return False
        return len(component.get("content", "")) >= len(pattern)
    return True


def _max_chars_per_token(spec: dict, backend) -> int | None:
    """The most characters of a text one token can stand for, when that is provable: the normalizer and
    pre-tokenizer never shorten the text, and the model never merges unknown text into one token (BPE with
    byte fallback or without fused unknowns), so each token is a vocabulary piece (or a byte of one
    character) of the text. Then a text of n characters has at least n / (longest piece) tokens. None when
    not provable."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None
    if not (_never_shortens(spec.get("normalizer"), _NON_SHRINKING_NORMALIZERS)
            and _never_shortens(spec.get("pre_tokenizer"), _NON_SHRINKING_PRE_TOKENIZERS)):
        return None
    return max(len(piece) for piece in backend.get_vocab(with_added_tokens=True))


def serialize_tokenizer(tokenizer) -> tuple[str, int, int]:
    """(Rust tokenizer JSON, BOS id, EOS id): what `ChatEncoder.from_serialized` needs."""
    return tokenizer.backend_tokenizer.to_str(), tokenizer.bos_token_id, tokenizer.eos_token_id


def answer_token(encoding, answer_start: int) -> int:
    """Index of the first token that begins at or after character `answer_start` (the space before the
    answer), from the tokenizer's character offsets; the token count if there is none."""
    n = len(encoding.ids)
    k = encoding.char_to_token(answer_start)
    if k is None:  # the character maps to no token (e.g. dropped by a normalizer): scan the offsets
        return next((i for i, (begin, _) in enumerate(encoding.offsets) if begin >= answer_start), n)
    return k if encoding.token_to_chars(k)[0] >= answer_start else k + 1


_encoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _encoder_for(tokenizer) -> ChatEncoder:
    encoder = _encoders.get(tokenizer)
    if encoder is None:
        encoder = _encoders[tokenizer] = ChatEncoder(tokenizer)
    return encoder


def encode_conversation(pairs: Sequence[Pair], tokenizer, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                        max_seq_len: int | None = None) -> Encoded | str:
    """One conversation through the training encoder (convenience wrapper around ChatEncoder)."""
    encoder = _encoder_for(tokenizer)
    if max_seq_len != encoder.max_seq_len:
        encoder = ChatEncoder(tokenizer, max_seq_len)
    return encoder.encode_batch([(pairs, system_prompt)])[0]


def encode_generation_prompt(messages: Sequence[dict], tokenizer,
                             system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Ids of a chat history ending with a user message, up to and including the final `[/INST]`.

    `messages`: `{"role": "user"|"assistant", "content": str}` alternating, starting and ending with
    "user". The ids equal the training encoder's for the same history (BOS before every block, every
    completed pair closed by `</s>`), so the model's continuation is the next answer.
    """
    roles = [m["role"] for m in messages]
    if not roles or len(roles) % 2 == 0 or any(r != ("user" if i % 2 == 0 else "assistant")
                                               for i, r in enumerate(roles)):
        raise ValueError(f"messages must alternate user/assistant, starting and ending with user; got {roles}")
    encoder = _encoder_for(tokenizer)
    pairs = [Pair(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
    ids: list[int] = []
    if pairs:
        done = encoder.encode_batch([(pairs, system_prompt)])[0]
        ids = done.ids
    last = render_generation_prompt(messages[-1]["content"], system_prompt if not pairs else None)
    return ids + [encoder.bos_id, *encoder.encode_texts([last])[0].ids]
