"""Model benchmark: training-step (forward + backward) throughput and decode speed, JAX vs PyTorch/transformers.

    python -m bench.bench_model                 # the bench config (~58M parameters, seq 512, vocab 32000)
    python -m bench.bench_model --size smoke    # seconds-long smoke run at toy size

Training step: loss = mean next-token cross-entropy, gradients w.r.t. all parameters (no optimizer update, so
both sides do the same work); same config, same batch; PyTorch on as many threads as this process may use,
with `transformers.LlamaForCausalLM` eager (SDPA attention) and, if it works here, `torch.compile`.
MFU = model FLOPs per second / this machine's float32 matmul peak (bench/matmul_peak.py, measured in the same
run). Model FLOPs per token = 6 · (parameters except the embedding table) + 6 · L · T · D (causal attention:
QKᵀ and AV, forward + backward, half of the T×T square). Decode: greedy tokens/s after a warm-up run, our
jitted KV-cache loop vs `transformers` generate (its KV cache), EOS disabled so both produce every token.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agentlm_jax.inference.generate import Generator
from agentlm_jax.config import ModelConfig, SamplingConfig
from agentlm_jax.model.llama import Llama, count_params

from bench.matmul_peak import measure_matmul_peak

SIZES = {
    "bench": dict(model=ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8,
                                    num_heads=8, num_kv_heads=8, max_position_embeddings=2048),
                  batch=4, seq=512, steps=5, prompt=64, new_tokens=128),
    "smoke": dict(model=ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                                    num_heads=4, num_kv_heads=2, max_position_embeddings=256),
                  batch=2, seq=64, steps=2, prompt=8, new_tokens=8),
}


@dataclasses.dataclass
class Row:
    name: str
    tokens_per_s: float | None
    mfu: float | None = None
    note: str = ""


def median_seconds(fn: Callable[[], object], steps: int) -> float:
    fn()  # warm-up: compile / allocate
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    dense = count_params(cfg) - cfg.vocab_size * cfg.hidden_size  # the embedding lookup is not a matmul
    attention = 6 * cfg.num_layers * seq * cfg.num_heads * cfg.resolved_head_dim
    return 6 * dense + attention


def batch(cfg: ModelConfig, b: int, t: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, cfg.vocab_size, (b, t + 1)).astype(np.int32)


# ------------------------------------------------------------------------------------------------ JAX
def jax_train_step(cfg: ModelConfig, tokens: np.ndarray) -> Callable[[], object]:
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    segment_ids = jnp.ones_like(inputs)

    @jax.jit
    def step(params):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(inputs, positions, segment_ids)
            # one-hot form: its gradient is dense (take_along_axis's is a scatter, slow on CPU)
            target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), -1)
            return (jax.nn.logsumexp(logits, axis=-1) - target_logit).mean()

        return jax.value_and_grad(loss_fn)(params)

    return lambda: jax.block_until_ready(step(params))


def jax_decode(cfg: ModelConfig, b: int, prompt: int, new_tokens: int) -> Callable[[], object]:
    generator = Generator(Llama(cfg, rngs=nnx.Rngs(0)), stop_token_ids=[])
    prompts = batch(cfg, b, prompt - 1).tolist()
    return lambda: generator(prompts, max_new_tokens=new_tokens, sampling=SamplingConfig(greedy=True))


# ---------------------------------------------------------------------------------------------- PyTorch
def torch_model(cfg: ModelConfig):
    import torch
    import transformers

    from agentlm_jax.hf import hf_config

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf_config(cfg, "float32")).float()


def torch_train_step(cfg: ModelConfig, tokens: np.ndarray, compile_model: bool) -> Callable[[], object]:
    import torch

    model = torch_model(cfg).train()
    ids = torch.as_tensor(tokens, dtype=torch.long)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    forward = torch.compile(model) if compile_model else model

    def step():
        logits = forward(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    return step


def torch_decode(cfg: ModelConfig, b: int, prompt: int, new_tokens: int) -> Callable[[], object]:
    import torch

    model = torch_model(cfg).eval()
    model.generation_config.eos_token_id = None
    ids = torch.as_tensor(batch(cfg, b, prompt - 1), dtype=torch.long)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return run


# ------------------------------------------------------------------------------------------------- main
def run(size: str, *, torch_compile: bool = True) -> str:
    import torch

    spec = SIZES[size]
    cfg: ModelConfig = spec["model"]
    b, t, steps = spec["batch"], spec["seq"], spec["steps"]
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    peak = measure_matmul_peak()["peak_flops"]
    tokens = batch(cfg, b, t)
    fpt = flops_per_token(cfg, t)

    def train_row(name: str, make: Callable[[], Callable[[], object]]) -> Row:
        try:
            seconds = median_seconds(make(), steps)
        except Exception as e:  # e.g. torch.compile without a working compiler: report, don't hide
            return Row(name, None, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        tps = b * t / seconds
        return Row(name, tps, tps * fpt / peak)

    train = [
        train_row("JAX (Flax NNX), float32, scanned layers", lambda: jax_train_step(cfg, tokens)),
        train_row("JAX (Flax NNX), float32, unrolled layers",
                  lambda: jax_train_step(cfg.replace(scan_layers=False), tokens)),
        train_row("JAX (Flax NNX), bfloat16 compute", lambda: jax_train_step(cfg.replace(dtype="bfloat16"), tokens)),
        train_row("PyTorch + transformers, eager", lambda: torch_train_step(cfg, tokens, compile_model=False)),
    ]
    if torch_compile:
        train.append(train_row("PyTorch + transformers, torch.compile",
                               lambda: torch_train_step(cfg, tokens, compile_model=True)))
    decode = []
    for db in (1, 4):
        for name, make in (("JAX KV-cache loop (jit, while_loop)", jax_decode),
                           ("transformers generate", torch_decode)):
            seconds = median_seconds(make(cfg, db, spec["prompt"], spec["new_tokens"]), max(1, steps // 2))
            decode.append(Row(f"{name}, batch {db}", db * spec["new_tokens"] / seconds,
                              note=f"prompt {spec['prompt']}, {spec['new_tokens']} new tokens"))
    return format_report(cfg, size, b, t, threads, peak, fpt, train, decode)


def format_report(cfg, size, b, t, threads, peak, fpt, train: list[Row], decode: list[Row]) -> str:
    reference = next(r.tokens_per_s for r in train if r.name.startswith("PyTorch") and r.tokens_per_s)
    lines = [f"Model `{size}`: {count_params(cfg) / 1e6:.1f}M parameters (D={cfg.hidden_size}, L={cfg.num_layers}, "
             f"N={cfg.num_heads}, F={cfg.intermediate_size}, V={cfg.vocab_size}); batch {b} × {t} tokens; "
             f"{threads} threads; float32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
             f"{fpt / 1e6:.1f} MFLOP per token (forward + backward).", "",
             "| training step (forward + backward) | tokens/s | vs PyTorch eager | MFU |", "|---|---:|---:|---:|"]
    for r in train:
        if r.tokens_per_s is None:
            lines.append(f"| {r.name} | {r.note} | | |")
        else:
            lines.append(f"| {r.name} | {r.tokens_per_s:,.0f} | {r.tokens_per_s / reference:.2f}× | {r.mfu:.1%} |")
    lines += ["", "| greedy decoding | new tokens/s | |", "|---|---:|---|"]
    lines += [f"| {r.name} | {r.tokens_per_s:,.1f} | {r.note} |" for r in decode]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="bench", choices=sorted(SIZES),
                   help="bench: ~58M parameters, seq 512, vocab 32000; smoke: a toy model (default %(default)s)")
    p.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile row")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    print(run(args.size, torch_compile=not args.no_torch_compile))


if __name__ == "__main__":
    main()
