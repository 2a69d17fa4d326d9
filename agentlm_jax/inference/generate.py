"""Batched text generation with a KV cache, compiled once: prefill the prompts, then one token per step in a
`jax.lax.while_loop`, all inside one `jax.jit`.

    generator = Generator(model, stop_token_ids=[2])
    result = generator([[1, 22172], [1, 3532, 29973]], max_new_tokens=32)   # result.tokens, .finished

Prompts of a batch are left-padded to a common length (padding has segment id 0 and is never attended to;
positions start at 0 at each prompt's first real token), so every row decodes into the same cache slot at
each step. Shapes are bucketed (prompt length and cache capacity rounded up to `length_multiple`), so new
prompts or a different `max_new_tokens` within a bucket reuse the compiled program. With `prompt_buckets`
(e.g. `geometric_buckets`), the prompt length is rounded up to the next bucket instead and the capacity is that
plus `max_new_tokens` rounded up to `length_multiple`: a handful of programs for prompts of any length, as
the evaluation suites need (every compile of a large model costs a minute on a TPU).

With `share_prefixes=True`, prompts that are prefixes of another prompt of the batch (the turns of one
conversation, as the `actions` evaluation asks for them) are not prefilled on their own: each longest prompt
(a *source*) is prefilled once, and every row starts from a copy of its source's cache cut to its own length
(shifted so that all rows still decode into the same slot; the source's later tokens are masked out).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agentlm_jax import distributed
from agentlm_jax.config import ModelConfig, SamplingConfig
from agentlm_jax.inference.sampling import sample
from agentlm_jax.model.kv_cache import KVCache
from agentlm_jax.model.llama import Llama

log = logging.getLogger(__name__)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def geometric_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 1.5·smallest, 2·smallest, 3·smallest, 4·smallest, 6·smallest, ... up to the first one >= largest:
    two buckets per doubling, so a prompt is padded by at most half its length (about a fifth on average)."""
    out, power = [smallest], smallest
    while out[-1] < largest:
        out.append(power * 3 // 2)
        power *= 2
        if out[-1] < largest:
            out.append(power)
    return tuple(out)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """tokens, positions, segment_ids [B, length] int32 with each prompt right-aligned after padding."""
    B = len(prompts)
    tokens = np.full((B, length), pad_id, np.int32)
    positions = np.zeros((B, length), np.int32)
    segment_ids = np.zeros((B, length), np.int32)
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[b, length - n:] = prompt
        positions[b, length - n:] = np.arange(n)
        segment_ids[b, length - n:] = 1
    return tokens, positions, segment_ids


def nest_prefixes(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(sources, source_of): the indices of the prompts that are no other prompt's proper prefix (a prompt
    repeated counts once: its first index), and for every prompt the index of a source it is a prefix of.
    In lexicographic order a prompt's extensions follow it directly, so one pass from the end finds them."""
    order = sorted(range(len(prompts)), key=lambda i: (list(prompts[i]), -i))  # equal ones: the first comes last
    source_of = [0] * len(prompts)
    for j in range(len(order) - 1, -1, -1):
        i = order[j]
        if j + 1 < len(order):
            nxt = prompts[order[j + 1]]
            n = len(prompts[i])
            if len(nxt) >= n and list(nxt[:n]) == list(prompts[i]):
                source_of[i] = source_of[order[j + 1]]
                continue
        source_of[i] = i
    return sorted(set(source_of)), source_of


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, ending with the stop token if one was produced
    finished: list[bool]  # True where a stop token ended the row (False: max_new_tokens reached)
    steps: int  # decode steps taken (the longest row)


class Generator:
    """Batched KV-cache decoding for a Llama; reuse one instance to reuse its compiled programs."""

    def __init__(self, model: Llama, *, stop_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                 length_multiple: int = 64, prompt_buckets: Sequence[int] | None = None):
        self.config: ModelConfig = model.config
        self.graphdef, self.state = nnx.split(model)
        self.stop_ids = np.asarray(stop_token_ids if stop_token_ids is not None else self.config.stop_token_ids,
                                   np.int32)
        self.pad_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        self.length_multiple = length_multiple
        self.prompt_buckets = tuple(sorted(prompt_buckets)) if prompt_buckets else ()

    def shape(self, longest_prompt: int, max_new_tokens: int) -> tuple[int, int]:
        """(padded prompt length, cache capacity) of a batch: what a compiled program is specialised to."""
        bucket = next((b for b in self.prompt_buckets if b >= longest_prompt), None)
        if bucket is None:
            prompt_len = round_up(longest_prompt, self.length_multiple)
            return prompt_len, round_up(prompt_len + max_new_tokens, self.length_multiple)
        return bucket, bucket + round_up(max_new_tokens, self.length_multiple)

    def batch_shape(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    share_prefixes: bool = False, exact: bool = False) -> tuple[int, int, int]:
        """(padded prompt length, cache capacity, prefilled rows) of a batch: with the number of rows, what its
        compiled program is specialised to. With `share_prefixes`, prefilled rows < rows where prompts nest:
        rounded up to a power of two (a few programs whatever the nesting) unless `exact` (for a caller that
        pads every batch to one shape of its own: `pad_to`)."""
        prompt_len, capacity = self.shape(max(len(p) for p in prompts), max_new_tokens)
        sources = len(nest_prefixes(prompts)[0]) if share_prefixes else len(prompts)
        if sources < len(prompts) and not exact:
            sources = min(len(prompts), 1 << (sources - 1).bit_length())
        return prompt_len, capacity, sources

    def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0, share_prefixes: bool = False,
                 pad_to: tuple[int, int, int] | None = None, warn_past_positions: bool = True) -> Generation:
        """New tokens for every prompt. `share_prefixes`: prefill only the prompts that are no other prompt's
        prefix (see the module's docstring); the result is the same. `pad_to`: a shape (`batch_shape`) to pad
        this batch's exact one up to (e.g. the largest of several batches, so that they all run one compiled
        program). `warn_past_positions=False`: the caller drops what a row generates past
        max_position_embeddings."""
        program, args, static = self._program(prompts, max_new_tokens, sampling, seed, share_prefixes, pad_to,
                                              warn_past_positions, self.state)
        out, steps = program(*args, **static)
        out, steps = distributed.to_host(out), int(distributed.to_host(steps))
        result, finished = [], []
        for row in out[:, :steps]:
            stops = np.flatnonzero(np.isin(row, self.stop_ids))
            result.append(row[: stops[0] + 1].tolist() if len(stops) else row.tolist())
            finished.append(bool(len(stops)))
        return Generation(result, finished, steps)

    def compile(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, state=None,
                sampling: SamplingConfig = SamplingConfig(), share_prefixes: bool = False,
                pad_to: tuple[int, int, int] | None = None) -> None:
        """Compile, without running, the program that the same call would run, so that the call finds it
        compiled. `state`: the parameters (default: the generator's own); `jax.ShapeDtypeStruct`s with their
        shardings do (e.g. from another thread while training donates the arrays)."""
        program, args, static = self._program(prompts, max_new_tokens, sampling, 0, share_prefixes, pad_to, False,
                                              self.state if state is None else state)
        program.lower(*args, **static).compile()

    def _program(self, prompts, max_new_tokens, sampling, seed, share_prefixes, pad_to, warn_past_positions, state):
        """(jitted function, arguments, static arguments) of a call."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_len, capacity, prefilled = self.batch_shape(prompts, max_new_tokens, share_prefixes=share_prefixes,
                                                           exact=pad_to is not None)
        if pad_to is not None:
            prompt_len, capacity, prefilled = (max(a, b) for a, b in zip((prompt_len, capacity, prefilled), pad_to))
            prefilled = min(prefilled, len(prompts))
            capacity = max(capacity, prompt_len + round_up(max_new_tokens, self.length_multiple))
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.config.max_position_embeddings and warn_past_positions:
            log.warning("prompt + new tokens = %d positions > max_position_embeddings = %d: quality will suffer",
                        longest, self.config.max_position_embeddings)
        static = dict(graphdef=self.graphdef, sampling=sampling, capacity=capacity, pad_id=self.pad_id)
        steps_and_seed = (jnp.int32(max_new_tokens), self.stop_ids, jax.random.key(seed))
        if prefilled == len(prompts):
            return _generate, (state, *left_pad(prompts, prompt_len, self.pad_id), *steps_and_seed), static
        sources, source_of = nest_prefixes(prompts)
        row_source = np.asarray([sources.index(source_of[i]) for i in range(len(prompts))], np.int32)
        sources += [sources[-1]] * (prefilled - len(sources))  # the last one repeated
        tokens, positions, segment_ids = left_pad([prompts[i] for i in sources], prompt_len, self.pad_id)
        row_length = np.asarray([len(p) for p in prompts], np.int32)
        return _generate_shared, (state, tokens, positions, segment_ids, row_source, row_length,
                                  *steps_and_seed), static


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "capacity", "pad_id"))
def _generate(state, tokens, positions, segment_ids, max_new_tokens, stop_ids, rng, *,
              graphdef, sampling: SamplingConfig, capacity: int, pad_id: int):
    """Prefill + while-loop decode. Returns (new tokens [B, capacity - P], number of steps)."""
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    cache = KVCache.create(model.config, B, capacity)
    logits, cache = model.decode(tokens, positions, segment_ids, cache, last_only=True)
    return _decode(graphdef, state, cache, logits[:, -1], positions[:, -1] + 1, max_new_tokens, stop_ids, rng,
                   sampling=sampling, pad_id=pad_id, out_len=capacity - P)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "capacity", "pad_id"))
def _generate_shared(state, tokens, positions, segment_ids, row_source, row_length, max_new_tokens,
                     stop_ids, rng, *, graphdef, sampling: SamplingConfig, capacity: int, pad_id: int):
    """`_generate` for R rows that are prefixes of G sources: row r is the first row_length[r] tokens of source
    row_source[r]. The sources [G, P] are prefilled once; each row's cache is its source's, shifted right by
    the source tokens it does not have, so that its prompt ends at slot P as a left-padded prompt would."""
    model = nnx.merge(graphdef, state)
    G, P = tokens.shape
    h, cache = model.decode_states(tokens, positions, segment_ids, KVCache.create(model.config, G, capacity))
    shift = segment_ids.sum(axis=1)[row_source] - row_length  # [R] source tokens after the row's prompt
    logits = model.logits(h[row_source, P - 1 - shift][:, None])  # at each row's last prompt token
    slots = jnp.arange(capacity)
    from_slot = jnp.clip(slots[None, :] - shift[:, None], 0, capacity - 1)  # [R,S]
    rows = (slice(None), row_source[:, None, None], jnp.arange(cache.k.shape[2])[None, :, None], from_slot[:, None])
    in_prompt = (slots[None, :] >= P - row_length[:, None]) & (slots[None, :] < P)
    cache = KVCache(k=cache.k[rows], v=cache.v[rows],  # [L,R,K,S,H]
                    segment_ids=in_prompt.astype(jnp.int32), length=cache.length)
    return _decode(graphdef, state, cache, logits[:, -1], row_length, max_new_tokens, stop_ids, rng,
                   sampling=sampling, pad_id=pad_id, out_len=capacity - P)


def _decode(graphdef, state, cache: KVCache, logits, position, max_new_tokens, stop_ids, rng, *,
            sampling: SamplingConfig, pad_id: int, out_len: int):
    """Sample from the prefill's last logits [B,V], then one token per step in a while loop until every row has
    stopped or `max_new_tokens`; row b's next token is at position[b]. Returns (new tokens [B, out_len], steps)."""
    B = logits.shape[0]
    rng, step_rng = jax.random.split(rng)
    first = sample(logits, step_rng, sampling)
    out = jnp.full((B, out_len), pad_id, jnp.int32).at[:, 0].set(first)
    one_segment = jnp.ones((B, 1), jnp.int32)

    def keep_going(carry):
        step, _, _, _, done, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(carry):
        # The parameters ride in the carry (unchanged): NNX modules must be built at the loop body's trace level.
        step, cache, token, position, done, out, rng, state = carry
        logits, cache = nnx.merge(graphdef, state).decode(token[:, None], position[:, None], one_segment, cache)
        rng, step_rng = jax.random.split(rng)
        token = jnp.where(done, pad_id, sample(logits[:, -1], step_rng, sampling))
        out = jax.lax.dynamic_update_index_in_dim(out, token, step, axis=1)
        return step + 1, cache, token, position + 1, done | jnp.isin(token, stop_ids), out, rng, state

    carry = (jnp.int32(1), cache, first, position, jnp.isin(first, stop_ids), out, rng, state)
    step, _, _, _, _, out, _, _ = jax.lax.while_loop(keep_going, decode_one, carry)
    return out, step
