"""Text generation with a KV cache, compiled once: prefill the prompts, then one token per step in a
`jax.lax.while_loop`, all inside one `jax.jit`.

    python -m agentlm_jax.generate --model runs/tiny/hf --prompt "Hello" --max-new-tokens 32 --greedy
    python -m agentlm_jax.generate --model runs/tiny/checkpoints --tokenizer TOK --chat --prompt "ls /tmp?"

`--model` is a Hugging Face directory or a training run's orbax checkpoint directory (`--step`, default the
latest). Prompts of a batch are left-padded to a common length (padding has segment id 0 and is never attended
to; positions start at 0 at each prompt's first real token), so every row decodes into the same cache slot at
each step. Shapes are bucketed (prompt length and cache capacity rounded up to `length_multiple`), so new
prompts or a different `--max-new-tokens` within a bucket reuse the compiled program.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from agentlm_jax import distributed
from agentlm_jax.export import add_mesh_args, cli_mesh, default_tokenizer, load_params, require_all_devices
from agentlm_jax.model.config import ModelConfig
from agentlm_jax.model.kv_cache import KVCache
from agentlm_jax.model.llama import Llama, abstract_model
from agentlm_jax.sampling import SamplingConfig, sample

log = logging.getLogger("agentlm_jax.generate")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, ending with the stop token if one was produced
    finished: list[bool]  # True where a stop token ended the row (False: max_new_tokens reached)
    steps: int  # decode steps taken (the longest row)


class Generator:
    """Batched KV-cache decoding for a Llama; reuse one instance to reuse its compiled programs."""

    def __init__(self, model: Llama, *, stop_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                 length_multiple: int = 64):
        self.config: ModelConfig = model.config
        self.graphdef, self.state = nnx.split(model)
        self.stop_ids = np.asarray(stop_token_ids if stop_token_ids is not None else [self.config.eos_token_id],
                                   np.int32)
        self.pad_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        self.length_multiple = length_multiple

    def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> Generation:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_len = round_up(max(len(p) for p in prompts), self.length_multiple)
        capacity = round_up(prompt_len + max_new_tokens, self.length_multiple)
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.config.max_position_embeddings:
            log.warning("prompt + new tokens = %d positions > max_position_embeddings = %d: quality will suffer",
                        longest, self.config.max_position_embeddings)
        tokens, positions, segment_ids = left_pad(prompts, prompt_len, self.pad_id)
        out, steps = _generate(self.graphdef, self.state, tokens, positions, segment_ids,
                               jnp.int32(max_new_tokens), self.stop_ids, jax.random.key(seed),
                               sampling=sampling, capacity=capacity, pad_id=self.pad_id)
        out, steps = distributed.to_host(out), int(distributed.to_host(steps))
        result, finished = [], []
        for row in out[:, :steps]:
            stops = np.flatnonzero(np.isin(row, self.stop_ids))
            result.append(row[: stops[0] + 1].tolist() if len(stops) else row.tolist())
            finished.append(bool(len(stops)))
        return Generation(result, finished, steps)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "capacity", "pad_id"))
def _generate(graphdef, state, tokens, positions, segment_ids, max_new_tokens, stop_ids, rng, *,
              sampling: SamplingConfig, capacity: int, pad_id: int):
    """Prefill + while-loop decode. Returns (new tokens [B, capacity - P], number of steps)."""
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    cache = KVCache.create(model.config, B, capacity)
    logits, cache = model.decode(tokens, positions, segment_ids, cache, last_only=True)
    rng, step_rng = jax.random.split(rng)
    first = sample(logits[:, -1], step_rng, sampling)
    out = jnp.full((B, capacity - P), pad_id, jnp.int32).at[:, 0].set(first)
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

    carry = (jnp.int32(1), cache, first, positions[:, -1] + 1, jnp.isin(first, stop_ids), out, rng, state)
    step, _, _, _, _, out, _, _ = jax.lax.while_loop(keep_going, decode_one, carry)
    return out, step


# -------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agentlm_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face directory or orbax checkpoint directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: a Hugging Face --model's own "
                   "tokenizer files; for an orbax checkpoint, the tokenizer the training run recorded)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the Llama-2-chat template")
    p.add_argument("--system-prompt", default=None, help="system prompt for --chat (default: the training one)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_mesh_args(p, fsdp=1)
    return p.parse_args(argv)


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool, system_prompt: str | None) -> list[list[int]]:
    if not chat:  # `<s>` first, as every training block began (the pipeline's tokenizer adds no BOS itself)
        return [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    from data_pipeline.chat_template import DEFAULT_SYSTEM_PROMPT, encode_generation_prompt

    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return [encode_generation_prompt([{"role": "user", "content": p}], tokenizer, system_prompt=system)
            for p in prompts]


def load_model(source: str, *, step: int | None = None, dtype: str = "float32",
               mesh: Mesh | None = None) -> tuple[ModelConfig, Llama]:
    """A Llama from a Hugging Face directory or an orbax checkpoint directory, for inference (parameters
    stored in the compute dtype, sharded over `mesh` if given)."""
    cfg, params = load_params(source, step=step, runtime={"dtype": dtype, "param_dtype": dtype}, mesh=mesh)
    graphdef, _ = nnx.split(abstract_model(cfg))
    return cfg, nnx.merge(graphdef, params)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """On a pod slice, run it on every worker (tpu/run.sh --foreground ...): the hosts join up, the model is
    sharded over all devices (--fsdp -1), every host decodes the same prompts, process 0 prints."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    distributed.initialize(args.distributed)
    mesh = cli_mesh(args)
    require_all_devices(mesh)
    from data_pipeline.tokenizer import load_tokenizer

    tokenizer_dir = args.tokenizer or default_tokenizer(args.model, step=args.step)
    if tokenizer_dir is None:
        raise SystemExit(f"no tokenizer found with {args.model}; pass --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg, model = load_model(args.model, step=args.step, dtype=args.dtype, mesh=mesh)
    prompts = encode_prompts(tokenizer, args.prompt, chat=args.chat, system_prompt=args.system_prompt)
    sampling = (SamplingConfig(greedy=True) if args.greedy else
                SamplingConfig(greedy=False, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k))
    stop_ids = sorted({cfg.eos_token_id, tokenizer.eos_token_id} - {None})
    generator = Generator(model, stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    result = generator(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    seconds = time.perf_counter() - start
    outputs = []
    for prompt, prompt_ids, ids, finished in zip(args.prompt, prompts, result.tokens, result.finished):
        record = {"prompt": prompt, "completion": tokenizer.decode(ids, skip_special_tokens=True),
                  "prompt_tokens": list(prompt_ids), "tokens": ids, "stopped": finished}
        outputs.append(record)
        if distributed.is_main_process():
            print(json.dumps(record, ensure_ascii=False) if args.json else f"### {prompt}\n{record['completion']}\n")
    log.info("%d prompts, %d steps, %.1f s (compile included)", len(prompts), result.steps, seconds)
    return outputs


if __name__ == "__main__":
    main()
