"""A model as the evaluation suites use it: batched greedy completion through the stack's KV-cache `Generator`,
chat prompts in the template the data was built with, and next-token log-probabilities.

    lm = LM(model, tokenizer, batch_size=8)
    outs = lm.complete([[1, 518, ...], ...], max_new_tokens=128)       # new token ids per prompt
    ids = lm.chat_prompt([{"role": "user", "content": "..."}])         # generation prompt ids
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agentlm_jax.config import SamplingConfig
from agentlm_jax.errors import ConfigError
from agentlm_jax.inference.generate import Generator, geometric_buckets, left_pad, nest_prefixes, round_up

log = logging.getLogger(__name__)

CHAT_TEMPLATES = ("auto", "llama2", "hf")
GREEDY = SamplingConfig(greedy=True)


def data_template_of(manifest: dict, where: str = "manifest.json") -> dict:
    """{"template": "llama2"|"hf", "text": Jinja text or None, "system_prompt"} of a data_pipeline manifest:
    the chat template its examples were rendered with (older manifests without one: llama2)."""
    entry = manifest.get("chat_template") or {"name": "llama2"}
    system = (manifest.get("config") or {}).get("system_prompt")
    if entry.get("name") == "llama2":
        return {"template": "llama2", "text": None, "system_prompt": system}
    if not entry.get("text"):
        raise ConfigError(f"{where}: chat_template {entry.get('name')!r} has no text; rebuild the data or pass "
                          f"--chat-template")
    return {"template": "hf", "text": entry["text"], "system_prompt": system}


def spread_groups(groups: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Groups of rows (a record's turns: one prefill serves those in one batch) into batches of at most
    `batch_size` rows, as few as first-fit by decreasing size finds, each group going to the batch with the
    fewest groups that has room, so that when every batch is padded to the most groups (sources) of any, few
    are padding. A group larger than a batch is cut into batch-sized pieces first."""
    pieces = [list(g[k:k + batch_size]) for g in groups for k in range(0, len(g), batch_size)]
    batches: list[list[int]] = [[] for _ in range(-(-sum(map(len, pieces)) // batch_size))]
    count = [0] * len(batches)
    for piece in sorted(pieces, key=len, reverse=True):
        room = [b for b in range(len(batches)) if len(batches[b]) + len(piece) <= batch_size]
        if not room:
            batches.append([])
            count.append(0)
            room = [len(batches) - 1]
        b = min(room, key=lambda b: (count[b], len(batches[b])))
        batches[b] += piece
        count[b] += 1
    return [b for b in batches if b]


class LM:
    def __init__(self, model, tokenizer, *, batch_size: int = 8, chat_template: str = "auto",
                 system_prompt: str | None = None, length_multiple: int = 64, data_template: dict | None = None,
                 one_shape: bool = False):
        """`chat_template`: auto | llama2 | hf. `data_template`: what a dataset's manifest says it was built
        with (`data_template_of`); with `auto` it wins over the tokenizer's own template. `one_shape`: every
        batch of a `complete` call is padded to the shape of the largest, so a call runs one compiled program
        (two where some batches share a prefill and others do not; the in-loop evaluation asks for the same
        turns each time: it compiles once per run, not per batch)."""
        from data_pipeline.formats.chat_template import DEFAULT_SYSTEM_PROMPT

        if chat_template not in CHAT_TEMPLATES:
            raise ConfigError(f"chat template {chat_template!r}: choose one of {', '.join(CHAT_TEMPLATES)}")
        self.jinja = None  # the Jinja text used for `hf` (None: the tokenizer's own)
        if chat_template == "auto" and data_template is not None:
            chat_template = data_template["template"]
            self.jinja = data_template.get("text")
            if system_prompt is None:  # the effective one the manifest records; none: llama2's default / no system
                recorded = data_template.get("system_prompt")
                system_prompt = recorded if recorded is not None else (None if chat_template == "llama2" else "")
        if chat_template == "hf" and not (self.jinja or getattr(tokenizer, "chat_template", None)):
            raise ConfigError("--chat-template hf: the tokenizer has no chat template; use llama2")
        if chat_template == "auto":
            chat_template = "hf" if getattr(tokenizer, "chat_template", None) else "llama2"
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.chat_template = chat_template
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.config = model.config
        stop_ids = sorted({*self.config.stop_token_ids, tokenizer.eos_token_id} - {None})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.config.pad_token_id
        # Geometric prompt buckets (and power-of-two batches, below): a few programs for any mix of prompts.
        self.generator = Generator(model, stop_token_ids=stop_ids, pad_token_id=pad, length_multiple=length_multiple,
                                   prompt_buckets=geometric_buckets(length_multiple, self.config.max_position_embeddings))
        self.pad_id, self.length_multiple, self.one_shape = pad, length_multiple, one_shape
        self._forward = None

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    # ---------------------------------------------------------------------------------------------- generation
    def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
        """Greedy continuations (new ids, the stop token removed) of every prompt, `batch_size` at a time; the
        answers come back in the prompts' order. Prompts that are prefixes of a longer one (the turns of one
        conversation) are put next to it, so that those in its batch share its prefill
        (`Generator(share_prefixes=True)`); the groups are ordered by length (less padding), or, with
        `one_shape`, spread evenly over the batches (all padded to one shape: the fewest prefilled rows). No
        answer runs past the model's positions: each is cut at min(its budget, max_position_embeddings - its
        prompt), at least 1."""
        limits = self._limits(prompts, max_new_tokens)
        out: list[list[int] | None] = [None] * len(prompts)
        stops = set(self.generator.stop_ids.tolist())
        for chunk, rows, new, shape in self._batches(prompts, limits):
            result = self.generator(rows, max_new_tokens=new, sampling=GREEDY, share_prefixes=True, pad_to=shape,
                                    warn_past_positions=False)
            for i, ids in zip(chunk, result.tokens):
                ids = ids[:limits[i]]
                out[i] = ids[:-1] if ids and ids[-1] in stops else ids
            if on_batch:
                on_batch(len(chunk))
        return out  # type: ignore[return-value]

    def compile(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int], state=None) -> None:
        """Compile, without running, the programs `complete` would run for these prompts (`state`: as
        `Generator.compile`; a program already compiled is found in JAX's cache)."""
        limits = self._limits(prompts, max_new_tokens)
        for _, rows, new, shape in self._batches(prompts, limits):
            self.generator.compile(rows, max_new_tokens=new, state=state, sampling=GREEDY, share_prefixes=True,
                                   pad_to=shape)

    def _limits(self, prompts, max_new_tokens: int | Sequence[int]) -> list[int]:
        """Each prompt's budget, cut at its room under max_position_embeddings (at least 1)."""
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        return [max(1, min(b, self.max_length - len(p))) for b, p in zip(budgets, prompts)]

    def _batches(self, prompts, limits) -> list[tuple[list[int], list, int, tuple[int, int, int] | None]]:
        """(prompt indices, rows, max new tokens, pad_to) per batch of `complete`."""
        _, source_of = nest_prefixes(prompts)
        groups: dict[int, list[int]] = {}  # a source's prompts, by source length, each by length
        for i in sorted(range(len(prompts)), key=lambda i: (len(prompts[source_of[i]]), source_of[i],
                                                            len(prompts[i]))):
            groups.setdefault(source_of[i], []).append(i)
        if self.one_shape:
            chunks = spread_groups(list(groups.values()), self.batch_size)
        else:
            order = [i for group in groups.values() for i in group]
            chunks = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        batches = []
        for chunk in chunks:
            # A row may decode past its own limit (a longer row of its batch has less room): those tokens are
            # dropped; being causal, they change nothing before them.
            rows = [prompts[i] for i in chunk]
            # A partial batch is filled up to a power of two: a few programs however many prompts are left (the
            # dbbench episodes still running shrink round by round), at most twice the rows.
            fill = self.batch_size if self.one_shape else min(self.batch_size, 1 << (len(rows) - 1).bit_length())
            batches.append([chunk, rows + [rows[0]] * (fill - len(rows)), max(limits[i] for i in chunk), None])
        if self.one_shape:  # one shape for the batches that share a prefill, one for the others
            shapes = [self.generator.batch_shape(rows, new, share_prefixes=True, exact=True)
                      for _, rows, new, _ in batches]
            for shared in (True, False):
                kind = [b for b, (_, rows, _, _) in enumerate(batches) if (shapes[b][2] < len(rows)) == shared]
                if kind:
                    prompt_len = max(shapes[b][0] for b in kind)
                    capacity = prompt_len + round_up(max(batches[b][2] for b in kind), self.length_multiple)
                    for b in kind:
                        batches[b][3] = (prompt_len, capacity, max(shapes[b][2] for b in kind))
        return [tuple(b) for b in batches]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---------------------------------------------------------------------------------------------------- chat
    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """The generation prompt of a history alternating user/assistant and ending with a user message, in
        the training template (llama2: the pipeline's own encoder; hf: the tokenizer's Jinja template)."""
        if self.chat_template == "llama2":
            from data_pipeline.formats.chat_template import encode_generation_prompt

            return encode_generation_prompt(list(messages), self.tokenizer, system_prompt=self.system_prompt or None)
        history = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + list(messages)
        text = self.tokenizer.apply_chat_template(history, chat_template=self.jinja, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids  # as the pipeline

    # ------------------------------------------------------------------------------------------ log-likelihood
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], candidates: Sequence[int]) -> np.ndarray:
        """log p(candidate | prompt) [N, len(candidates)]: one full forward pass per batch (no cache)."""
        if self._forward is None:
            self._forward = nnx.jit(lambda m, t, p, s: jax.nn.log_softmax(m(t, p, s)[:, -1], axis=-1))
        cand = np.asarray(candidates, np.int32)
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [list(p) for p in prompts[start:start + self.batch_size]]
            length = round_up(max(len(p) for p in chunk), self.length_multiple)
            tokens, positions, segment_ids = left_pad(chunk, length, self.pad_id)
            logp = np.asarray(jax.device_get(self._forward(self.model, jnp.asarray(tokens), jnp.asarray(positions),
                                                           jnp.asarray(segment_ids))))
            rows.append(logp[:, cand])
        return np.concatenate(rows) if rows else np.zeros((0, len(cand)), np.float32)
