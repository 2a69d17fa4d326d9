"""Any Hugging Face (Jinja) chat template, rendered through `transformers`' `apply_chat_template`, with a
loss mask that is checked on every conversation.

`--chat-template hf` takes the tokenizer's own template (`chat_template.jinja`, else `chat_template` in
`tokenizer_config.json`); `--chat-template PATH` a Jinja file; `llama2` (the default) is chat_template.py.

The messages of a conversation are `[system], user, assistant, user, assistant, ...` (the system message
only when there is a system prompt). The loss spans of the assistant turns are found in one of two ways:

  generation  the template marks assistant spans with `{% generation %}`: transformers'
              `return_assistant_tokens_mask` (with `return_dict=True`) gives them; there must be one run of
              masked tokens per assistant message.
  prefix      otherwise: the conversation is rendered before each assistant turn with
              `add_generation_prompt=True` (P_k) and through that turn (F_k). Each rendering must be a prefix
              of the next (F_{k-1} ⊑ P_k ⊑ F_k ⊑ the whole rendering); a template that is not is rejected
              (`template_not_prefix_stable`, naming the template and the message). The span of turn k is
              F_k minus P_k, up to and including its last special token (the end-of-turn token: `<|eot_id|>`,
              `<|im_end|>`); what a template writes after it (ChatML's "\\n") is not in the loss.
              The whole rendering (the last F) is transformers' `apply_chat_template(tokenize=False)`, tokenized
              as `apply_chat_template(tokenize=True)` tokenizes it: 2T renderings for T turns; the others are
              rendered with transformers' compiled template.

The contract, checked on every conversation (else `template_mismatch`, naming the template and the message):
the ids are `apply_chat_template(messages, tokenize=True)`, tokens do not straddle a span's boundaries, and
each trained turn's span is exactly its content (up to surrounding whitespace, which templates may trim)
followed by special tokens only: no generation prompt, no role header, at least one end-of-turn token.
An answer with tool calls is rendered by the template's own call syntax, so its span must hold its content and
the name of every call, then the end-of-turn token. Assistant turns with loss off and every other message (tool
results included) carry no loss. The record's `tools` go to the template as `apply_chat_template(tools=...)`.

Truncation keeps the same semantics as the Llama 2 path: the leading whole pairs whose rendering fits in
`max_seq_len` (the conversation is re-rendered and re-checked with only those); `first_pair_too_long` when
none fits, `no_loss_after_truncation` when the kept pairs have no trained answer.
"""

from __future__ import annotations

import bisect
import collections.abc
import dataclasses
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from data_pipeline.formats.chat_template import (FIRST_PAIR_TOO_LONG, NO_LOSS_AFTER_TRUNCATION, Encoded,
                                                 Pair, _max_chars_per_token)

LLAMA2, HF = "llama2", "hf"
TEMPLATES_DIR = str(Path(__file__).resolve().parents[1] / "templates")
TEMPLATE_NOT_PREFIX_STABLE = "template_not_prefix_stable"
TEMPLATE_MISMATCH = "template_mismatch"
TEMPLATE_REASONS = (TEMPLATE_NOT_PREFIX_STABLE, TEMPLATE_MISMATCH)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
    """A Jinja chat template as the build uses it (and the manifest records: `manifest_entry`)."""
    name: str  # "hf" or the Jinja file's path, as configured
    source: str  # where the text came from
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def mask(self) -> str:
        return "generation" if GENERATION_TAG.search(self.text) else "prefix"

    def manifest_entry(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "mask": self.mask,
                "text": self.text}


LLAMA2_MANIFEST_ENTRY = {"name": LLAMA2, "source": "data_pipeline/formats/chat_template.py", "sha256": None,
                         "mask": "llama2_blocks", "text": None}


def read_tokenizer_template(tokenizer_dir: str) -> tuple[str, str]:
    """(template text, the file it is in) of a tokenizer directory: `chat_template.jinja`, else the
    `chat_template` of `tokenizer_config.json` (a string, or a list of named templates: "default")."""
    jinja = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    config = os.path.join(tokenizer_dir, "tokenizer_config.json")
    template = None
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str) or not template:
        raise ValueError(f"{tokenizer_dir}: no chat template (neither chat_template.jinja nor a chat_template "
                         "in tokenizer_config.json); give --chat-template PATH_TO_JINJA or llama2")
    return template, config


def resolve_template(choice: str, tokenizer_dir: str) -> TemplateSpec | None:
    """None for `llama2`; the template of the tokenizer (`hf`) or of a Jinja file (a path)."""
    if choice == LLAMA2:
        return None
    if choice == HF:
        text, source = read_tokenizer_template(tokenizer_dir)
        return TemplateSpec(HF, source, text)
    if not os.path.isfile(choice):
        raise ValueError(f"--chat-template {choice!r}: not llama2, hf or a Jinja file")
    with open(choice, encoding="utf-8") as f:
        return TemplateSpec(choice, os.path.abspath(choice), f.read())


@dataclasses.dataclass(frozen=True)
class Reference:
    """transformers' `apply_chat_template(tokenize=True)` of one conversation: ids, character offsets into the
    rendering, and the {% generation %} assistant mask where the template has one."""
    ids: list[int]
    offsets: Sequence[tuple[int, int]]  # (start, end) character of each token
    assistant_mask: list[int] | None = None


class EncodingOffsets(collections.abc.Sequence):
    """The (start, end) character offsets of a `tokenizers.Encoding`'s tokens, read one by one from the encoding
    (`Encoding.offsets` would build the whole list of tuples): the same values, for the few tokens the contract
    check looks at (bisect over the offsets, the special tokens, the spans' ends)."""
    __slots__ = ("_encoding", "_len")

    def __init__(self, encoding):
        self._encoding, self._len = encoding, len(encoding)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if type(i) is int and 0 <= i < self._len:  # (the check's lookups: first, without the cases below)
            return self._encoding.token_to_chars(i)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        return self._encoding.token_to_chars(i)


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A conversation the template cannot encode as the contract requires (a rejected record)."""
    reason: str
    detail: str


def special_tokens_of(tokenizer) -> dict[str, str]:
    """The special-token strings a template sees (`bos_token`, ...), for rebuilding the tokenizer on a worker."""
    return {name: str(getattr(tokenizer, name)) for name in SPECIAL_TOKEN_NAMES if getattr(tokenizer, name, None)}


def tokenizer_from_json(tokenizer_json: str, special_tokens: dict[str, str]):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), **special_tokens)


class TemplateEncoder:
    """Encodes (pairs, system prompt) conversations with a Jinja chat template, checking the contract."""

    def __init__(self, tokenizer, template: TemplateSpec, max_seq_len: int | None = None):
        self.tokenizer, self.template, self.max_seq_len = tokenizer, template, max_seq_len
        self.text, self.name, self.uses_generation = template.text, template.name, template.mask == "generation"
        backend = tokenizer.backend_tokenizer
        specials = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.special},
                          key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.max_chars_per_token = _max_chars_per_token(json.loads(backend.to_str()), backend)
        self._compiled, self._special_tokens_map = None, dict(tokenizer.special_tokens_map)
        self._special_ids = {i: t.content for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._special_id_array = np.array(sorted(self._special_ids), np.int64)
        self._is_special_id = np.zeros(max(self._special_ids, default=-1) + 1, bool)  # id → is it special
        self._is_special_id[self._special_id_array] = True
        self._special_set = frozenset(specials)
        self._special_lengths = sorted({len(t) for t in specials})

    # ------------------------------------------------------------------ text checks
    def special_token_text(self, text: str | None) -> str | None:
        """The first special-token text in `text`, or None (such records are rejected: `special_token_text`)."""
        found = self._specials.search(text) if text and self._specials else None
        return found[0] if found else None

    def _special_run_start(self, text: str) -> int | None:
        """Where the run of special-token texts that ends `text` starts: the smallest i such that text[i:] (or
        text[i:-1], when `text` ends with a newline) is one or more special-token texts; None if there is none.
        The same as `re.search("(?:SPECIAL|...)+$", text).start()`, found from the end of the text (a regular
        expression search tries every start in the text)."""
        ends = [len(text)] + ([len(text) - 1] if text.endswith("\n") else [])
        best, seen, todo = None, set(ends), list(ends)
        while todo:
            end = todo.pop()
            for n in self._special_lengths:
                if n > end:
                    break
                if text[end - n:end] in self._special_set:
                    start = end - n
                    best = start if best is None or start < best else best
                    if start not in seen:
                        seen.add(start)
                        todo.append(start)
        return best

    def _last_special_end(self, text: str) -> int | None:
        """The end of the last special-token text in `text` (None if there is none)."""
        end = None
        for m in self._specials.finditer(text) if self._specials else ():
            end = m.end()
        return end

    # ------------------------------------------------------------------ rendering
    def messages(self, pairs: Sequence[Pair], system: str | None) -> list[dict]:
        """OpenAI-style messages: [system], then per pair its tool results, its user message, its answer."""
        msgs = [{"role": "system", "content": system}] if system else []
        for pair in pairs:
            msgs += [r.message() for r in pair.tool_results]
            if pair.user or not pair.tool_results:
                msgs.append({"role": "user", "content": pair.user})
            answer = {"role": "assistant", "content": pair.assistant}
            msgs.append(answer | ({"tool_calls": [c.message() for c in pair.tool_calls]} if pair.tool_calls else {}))
        return msgs

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: Sequence = ()) -> str:
        return self.render_many([messages], add_generation_prompt, tools)[0]

    def render_many(self, conversations: list[list[dict]], add_generation_prompt: bool = False,
                    tools: Sequence = ()) -> list[str]:
        """What `apply_chat_template(tokenize=False)` renders: transformers' compiled template, rendered with the
        arguments its `render_jinja_template` passes, without the per-call copying of the inputs into plain JSON
        types (ours are plain JSON already: parsed records, no None values). Each rendering is what
        `Template.render` does (a context of the template's globals and the arguments, then its root render
        function), with the template's globals merged once instead of once per conversation. A rendering that
        differed from transformers' would fail the checks of `_encode_whole` (the last prefix is transformers'
        own rendering)."""
        from transformers.utils.chat_template_utils import _compile_jinja_template

        if self._compiled is None:  # (with its globals, merged as Template.render merges them: they are fixed)
            compiled = _compile_jinja_template(self.text)
            self._compiled = compiled, dict(compiled.globals)
        template, template_globals = self._compiled
        arguments = template_globals | {"tools": list(tools) or None, "documents": None,
                                        "add_generation_prompt": add_generation_prompt, **self._special_tokens_map}
        out = []
        for messages in conversations:
            context = template.new_context(arguments | {"messages": messages}, shared=True)
            try:
                out.append(template.environment.concat(template.root_render_func(context)))
            except Exception:
                template.environment.handle_exception()  # (re-raises, as Template.render does)
        return out

    def _contract_texts(self, messages: list[list[dict]], tools: tuple) -> list[str]:
        """The whole rendering of each conversation that the training ids tokenize. For prefix templates it is
        transformers' own `apply_chat_template(tokenize=False)`: the text `apply_chat_template(tokenize=True)`
        tokenizes (`_references`), and the last of the prefix renderings the spans are proven on. For
        {% generation %} templates, our rendering (`apply_chat_template(tokenize=True)` gives the ids and masks)."""
        if self.uses_generation:
            return self.render_many(messages, tools=tools)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.text, tokenize=False,
                                                  tools=list(tools) or None)

    def _references(self, messages: list[list[dict]], tools: tuple, texts: list[str]) -> list[Reference]:
        """transformers' `apply_chat_template(tokenize=True)` of each conversation (`texts`: their
        `_contract_texts`), batched: the ids the contract compares with, their character offsets (into the
        rendering: the training ids are these ids, so the text is tokenized once), and for {% generation %}
        templates the assistant masks. For prefix templates the rendering is not done again: `texts` are
        transformers' renderings, tokenized as `apply_chat_template(tokenize=True)` tokenizes its rendering
        (`tokenizer(text, add_special_tokens=False)`, transformers' code; `tests/data_pipeline/test_hf_template.py`
        holds it to the real call). The offsets are read from the tokenizer's encodings where they are needed
        (EncodingOffsets), not converted whole into Python tuples (`return_offsets_mapping`: a tuple per token,
        ~15 % of the encoding time on long chats), and no attention mask is made (it is all ones)."""
        def tokenized(**tokenizer_kwargs):
            if self.uses_generation:
                return self.tokenizer.apply_chat_template(
                    messages, chat_template=self.text, tokenize=True, tools=list(tools) or None, return_dict=True,
                    # (the masks are made from the encodings' offsets: not asked for when there are none)
                    return_assistant_tokens_mask="return_offsets_mapping" not in tokenizer_kwargs,
                    tokenizer_kwargs=tokenizer_kwargs)
            return self.tokenizer(texts, add_special_tokens=False, **tokenizer_kwargs)

        out = tokenized(return_attention_mask=False)
        masks = out["assistant_masks"] if self.uses_generation else [None] * len(messages)
        if out.encodings is None:  # (no encodings to read the offsets from: have them converted)
            offsets = tokenized(return_offsets_mapping=True)["offset_mapping"]
        else:
            offsets = [EncodingOffsets(encoding) for encoding in out.encodings]
        return [Reference(list(ids), offs, None if mask is None else list(mask))
                for ids, offs, mask in zip(out["input_ids"], offsets, masks)]

    # ------------------------------------------------------------------ encoding
    def encode_batch(self, conversations: Sequence[tuple]) -> list[Encoded | str | Rejection]:
        """An `Encoded`, a filter reason (str) or a `Rejection` per (pairs, system[, tools]) conversation."""
        items = [(list(pairs), system, tuple(tools[0]) if tools else ()) for pairs, system, *tools in conversations]
        out: list = [None] * len(items)
        try:  # the common case in bulk: conversations that fit, rendered, tokenized and checked batch-wise
            self._encode_fitting(items, out)
        except Exception:  # (a template that raises on some conversation: each is then tried alone, below)
            out = [None] * len(items)
        for i, (pairs, system, tools) in enumerate(items):
            if out[i] is not None:
                continue
            try:
                out[i] = self.encode(pairs, system, tools)
            except Exception as e:  # a template that raises (raise_exception, bad Jinja) on this conversation
                out[i] = Rejection(TEMPLATE_MISMATCH, f"template {self.name}: rendering failed: "
                                                      f"{type(e).__name__}: {e}"[:500])
        return out

    def _encode_fitting(self, items: list[tuple], out: list) -> None:
        """Fills `out[i]` for the conversations whose whole rendering fits in max_seq_len (the others stay None)."""
        messages = [self.messages(pairs, system) for pairs, system, _ in items]
        by_tools: dict[str, list[int]] = {}
        for i, (_, _, tools) in enumerate(items):
            by_tools.setdefault(json.dumps(tools, sort_keys=True), []).append(i)
        texts: list = [None] * len(items)
        for group in by_tools.values():
            for i, text in zip(group, self._contract_texts([messages[i] for i in group], items[group[0]][2])):
                texts[i] = text
        limit = None if self.max_seq_len is None or self.max_chars_per_token is None else \
            (self.max_seq_len + 1) * self.max_chars_per_token
        short = {i for i in range(len(items)) if limit is None or len(texts[i]) <= limit}
        for group in by_tools.values():
            group = [i for i in group if i in short]
            if not group:
                continue
            references = self._references([messages[i] for i in group], items[group[0]][2],
                                          [texts[i] for i in group])
            for i, reference in zip(group, references):
                if self.max_seq_len is None or len(reference.ids) <= self.max_seq_len:
                    pairs, system, tools = items[i]
                    out[i] = self._encode_whole(pairs, system, tools, texts[i], reference, messages[i])

    def encode(self, pairs: list[Pair], system: str | None, tools: tuple = ()) -> Encoded | str | Rejection:
        text = self._contract_texts([self.messages(pairs, system)], tools)[0]
        limit = None  # characters that certainly hold more than max_seq_len tokens (chat_template.py's bound)
        if self.max_seq_len is not None and self.max_chars_per_token is not None:
            limit = (self.max_seq_len + 1) * self.max_chars_per_token
        if limit is not None and len(text) > limit:  # too long for sure: only its head is tokenized
            text = text[:limit]
            encoding = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        else:
            encoding = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
            if self.max_seq_len is None or len(encoding.ids) <= self.max_seq_len:
                return self._encode_whole(pairs, system, tools, text)
        # Too long: the leading whole pairs that fit, each candidate measured on the tokens of the whole
        # rendering (or of its head) when it is a prefix of it; then rendered again and checked alone.
        kept = self._pairs_that_fit(pairs, system, tools, text, [b for _, b in encoding.offsets])
        while kept > 0:
            if not any(p.loss for p in pairs[:kept]):
                return NO_LOSS_AFTER_TRUNCATION
            result = self._encode_whole(pairs[:kept], system, tools)
            if isinstance(result, Rejection):
                return result
            if len(result.ids) <= self.max_seq_len:
                return dataclasses.replace(result, pairs_dropped=len(pairs) - kept)
            kept -= 1  # (a token across the end of the estimate's last pair)
        return FIRST_PAIR_TOO_LONG

    def _pairs_that_fit(self, pairs: list[Pair], system: str | None, tools: tuple, text: str,
                        token_ends: list[int]) -> int:
        """The most leading pairs whose rendering has at most max_seq_len tokens (lengths grow with the pairs
        of a prefix-stable template: binary search)."""
        lo, hi = 0, len(pairs) - 1  # the whole conversation does not fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            prefix = self.render(self.messages(pairs[:mid], system), tools=tools)
            if len(prefix) > len(text):  # (longer than the head whose tokens are more than max_seq_len)
                n = self.max_seq_len + 1
            elif text.startswith(prefix):
                n = bisect.bisect_right(token_ends, len(prefix))
            else:
                n = len(self._ids(prefix))
            lo, hi = (mid, hi) if n <= self.max_seq_len else (lo, mid - 1)
        return lo

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_whole(self, pairs: list[Pair], system: str | None, tools: tuple = (),
                      text: str | None = None, reference: "Reference | None" = None,
                      messages: list[dict] | None = None) -> Encoded | Rejection:
        """`text` (the whole rendering), `reference` (`_references`) and `messages` when already computed."""
        messages = messages if messages is not None else self.messages(pairs, system)
        assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]  # message indices
        text = text if text is not None else self._contract_texts([messages], tools)[0]
        if reference is None:
            reference = self._references([messages], tools, [text])[0]
        ids, offsets = reference.ids, reference.offsets
        if len(ids) != len(offsets) or (len(ids) and offsets[-1][1] > len(text)) or any(
                text[slice(*offsets[i])] != content for i, content in self._special_tokens_at(ids)):
            return self._mismatch("the tokens of apply_chat_template(messages, tokenize=True) do not match the "
                                  "rendering (its special tokens are not where the rendered text has them)")
        if self.uses_generation:
            runs = _runs(reference.assistant_mask)
            if len(runs) != len(pairs):
                return self._mismatch(f"{len(runs)} {{% generation %}} spans for {len(pairs)} assistant messages")
            spans = [(offsets[a][0], offsets[b - 1][1]) for a, b in runs]
        else:
            prompts = self.render_many([messages[:at] for at in assistant_at], True, tools)
            answers = self.render_many([messages[:at + 1] for at in assistant_at[:-1]], False, tools) + [text]
            renders = []  # (text, what it renders): P_1, F_1, P_2, F_2, ... (the last F: the whole rendering)
            for k, at in enumerate(assistant_at):
                renders += [(prompts[k], f"messages 1-{at} with the generation prompt"),
                            (answers[k], f"messages 1-{at + 1}")]
            for k in range(1, len(renders)):
                if not renders[k][0].startswith(renders[k - 1][0]):
                    at = assistant_at[k // 2]
                    return Rejection(TEMPLATE_NOT_PREFIX_STABLE,
                                     f"template {self.name}: at assistant message {at + 1} (turn {k // 2 + 1}), the "
                                     f"rendering of {renders[k - 1][1]} is not a prefix of the rendering of "
                                     f"{renders[k][1]}")
            spans = []
            for k in range(len(pairs)):
                start, full = len(renders[2 * k][0]), renders[2 * k + 1][0]
                end = self._last_special_end(full[start:])
                spans.append((start, start + end if end is not None else len(full)))
        mask = [0] * len(ids)
        for k, (pair, (begin, end)) in enumerate(zip(pairs, spans)):
            message = assistant_at[k] + 1
            # the answer's tokens: from the first that ends after `begin` to the last that starts before `end`
            # (token starts and ends are non-decreasing)
            first = bisect.bisect_right(offsets, begin, key=lambda o: o[1])
            last = bisect.bisect_left(offsets, end, key=lambda o: o[0])
            if first < last and (offsets[first][0] < begin or offsets[last - 1][1] > end):
                return self._mismatch(f"a token straddles the boundary of the answer in message {message}")
            region = text[begin:end]
            tail = self._special_run_start(region)
            if tail is None:
                return self._mismatch(f"the answer span of message {message} does not end with an end-of-turn "
                                      f"(special) token: {region[-40:]!r}")
            answer = region[:tail]
            if pair.tool_calls:  # (the template's own call syntax: content and every call's name, nothing else known)
                missing = [c.name for c in pair.tool_calls if c.name not in answer]
                if pair.assistant.strip() not in answer or missing:
                    return self._mismatch(f"the answer span of message {message} lacks its content or the calls "
                                          f"{missing} (does the template render tool_calls?): {region[:80]!r}")
            elif answer.strip() != pair.assistant.strip():
                return self._mismatch(f"the answer span of message {message} is not exactly its content + "
                                      f"end-of-turn: {region[:80]!r}")
            if pair.loss:
                mask[first:last] = [1] * (last - first)
        if 1 not in mask:
            return NO_LOSS_AFTER_TRUNCATION  # (normalize filters conversations without a trained answer)
        return Encoded(ids, mask, len(pairs), 0)

    def _special_tokens_at(self, ids: list[int]) -> list[tuple[int, str]]:
        """(position, text) of each special token in `ids`."""
        array = np.asarray(ids, np.int64)
        if not len(array):
            return []
        if array.min() < 0:  # (ids are never negative; the lookup table cannot index them)
            at = np.flatnonzero(np.isin(array, self._special_id_array))
        else:  # ids above the last special id are not special
            at = np.flatnonzero(self._is_special_id[np.minimum(array, len(self._is_special_id) - 1)]
                                & (array < len(self._is_special_id)))
        return [(int(i), self._special_ids[ids[i]]) for i in at]

    def _mismatch(self, what: str) -> Rejection:
        return Rejection(TEMPLATE_MISMATCH, f"template {self.name}: {what}")


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


_ENCODERS: dict[tuple, TemplateEncoder] = {}
_LOCK = threading.Lock()


def staged_encoder(tokenizer_json: str, tokenizer_sha256: str, special_tokens: dict[str, str],
                   template: TemplateSpec, max_seq_len: int | None) -> TemplateEncoder:
    """One TemplateEncoder per process and run (workers rebuild the tokenizer from its staged JSON)."""
    key = (tokenizer_sha256, tuple(sorted(special_tokens.items())), template.sha256, max_seq_len)
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS.clear()
            _ENCODERS[key] = TemplateEncoder(tokenizer_from_json(tokenizer_json, special_tokens), template,
                                             max_seq_len)
        return _ENCODERS[key]
