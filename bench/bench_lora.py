"""LoRA training benchmark: our LoRA train step against our full fine-tuning step and against peft + transformers
+ PyTorch doing the same LoRA step, on the training benchmark's model (configs/bench.yaml, ~58M parameters).

    python -m bench.bench_lora                       # seq 512, rank 16 on all seven projections
    python -m bench.bench_lora --seq 512,1024 --rounds 3
    python -m bench.bench_lora --smoke               # a toy model, seconds long (checks the benchmark itself)

Every side: the same packed batches (bench/bench_train.py's), token-level mean cross-entropy over the loss
tokens, global-norm clipping at 1.0, AdamW (β 0.9/0.95, weight decay 0.1), float32 everywhere (the LoRA base
too: `lora.base_dtype=float32`, so the comparison is of the training step, not of storage dtypes).
  * JAX full: `TrainStep` over every parameter (as bench_train.py).
  * JAX LoRA: `TrainStep` with `lora` (rank r, alpha 2r, targets q,k,v,o,gate,up,down): gradients and AdamW
    over the adapters only, the base an undifferentiated argument.
  * PyTorch LoRA: `peft.get_peft_model(LlamaForCausalLM, LoraConfig(r, 2r, the seven projections))`, AdamW over
    the trainable (adapter) parameters, `clip_grad_norm_` over them; eager, all the cores this process may use.
tokens/s over the timed steps after one warm-up step; peak RSS is the worker process's maximum resident set.
Each side runs in its own process; the sides take turns `--rounds` times and the median is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.bench_train import (HUGEPAGES, SMOKE_OVERRIDES, XLA_CPU_FLAGS, Result, cpu_model, load, median_result,
                               peak_rss_mb, read_batches, rss_mb, time_torch_steps, to_torch_batches,
                               tokens_per_batch, worker_env, write_batches)

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
KINDS = ("jax-full", "jax-lora", "torch-lora")


def lora_overrides(rank: int) -> list[str]:
    return ["lora.enabled=true", f"lora.rank={rank}", f"lora.alpha={2 * rank}", "lora.base_dtype=float32",
            f"lora.targets=[{','.join(TARGETS)}]"]


def jax_lora_worker(cfg, batches, steps: int) -> Result:
    import jax
    from flax import nnx

    from agentlm_jax.model.lora import init_adapters
    from agentlm_jax.model.llama import init_model
    from agentlm_jax.sharding import batch_sharding, make_mesh
    from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from agentlm_jax.training.state import abstract_params, base_shardings, init_train_state, train_state_shardings
    from agentlm_jax.training.step import TrainStep

    mesh, rules, lora = make_mesh(cfg.mesh), cfg.mesh.rules, cfg.lora
    optimizer = make_optimizer(cfg.optimizer, cfg.steps, abstract_params(cfg.model, lora))
    shardings = train_state_shardings(cfg.model, optimizer, mesh, rules, lora=lora)
    base_s = base_shardings(cfg.model, lora, mesh, rules)
    base = nnx.state(init_model(cfg.model.replace(param_dtype=lora.base_dtype), seed=0, mesh=mesh, rules=rules),
                     nnx.Param).to_pure_dict()
    adapters = init_adapters(cfg.model, lora, seed=0, mesh=mesh, rules=rules).to_pure_dict()
    state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=shardings, donate_argnums=0)(adapters)
    step = TrainStep(cfg.model, optimizer, learning_rate_schedule(cfg.optimizer, cfg.steps), mesh=mesh, rules=rules,
                     state_shardings=shardings, data=cfg.data, loss=cfg.loss, lora=lora, base_shardings=base_s)
    step.base = jax.device_put(base, base_s)
    on_device = batch_sharding(mesh, rules)
    device_batches = [{k: jax.device_put(v, on_device) for k, v in b.items()} for b in batches]
    start = time.perf_counter()
    state, metrics = step(state, device_batches[0])
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    before = rss_mb()
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, device_batches[(i + 1) % len(device_batches)])
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"non-finite loss {float(metrics['loss'])}")
    return Result(f"JAX LoRA (rank {lora.rank}, all projections)", steps * tokens_per_batch(batches) / seconds, first,
                  peak_rss_mb(), peak_rss_mb() - before)


def torch_lora_worker(cfg, batches, steps: int) -> Result:
    import peft
    import torch
    import transformers

    from agentlm_jax.hf import hf_config

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(hf_config(cfg.model, "float32")).float()
    lora = cfg.lora
    model = peft.get_peft_model(base, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                      target_modules=[f"{t}_proj" for t in lora.targets],
                                                      task_type="CAUSAL_LM")).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(trainable, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                  weight_decay=o.weight_decay)

    def train_step(b):
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        labels = b["labels"].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=-100,
                                                 reduction="sum") / (labels != -100).sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return time_torch_steps(train_step, to_torch_batches(batches), steps,
                            f"PyTorch + transformers + peft LoRA (rank {lora.rank}), eager")


def worker_main(kind: str, spec: dict) -> None:
    from bench.bench_train import jax_worker

    overrides = spec["overrides"] + (lora_overrides(spec["rank"]) if kind != "jax-full" else [])
    cfg = load(overrides, spec["seq"], spec["rows"])
    batches = read_batches(spec["batches"])
    if kind == "jax-full":
        result = dataclasses.replace(jax_worker(cfg, batches, spec["steps"]), name="JAX full fine-tuning")
    elif kind == "jax-lora":
        result = jax_lora_worker(cfg, batches, spec["steps"])
    else:
        result = torch_lora_worker(cfg, batches, spec["steps"])
    print(json.dumps(dataclasses.asdict(result)), flush=True)


def run_worker(kind: str, spec: dict, env: dict[str, str]) -> Result:
    cmd = [sys.executable, "-m", "bench.bench_lora", "--worker", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return Result(kind, error=f"failed: {tail}")
    return Result(**json.loads(lines[-1]))


def benchmark(seqs: list[int], *, tokens_per_step: int, steps: int, rounds: int, rank: int, smoke: bool) -> str:
    from agentlm_jax.model.llama import count_params
    from agentlm_jax.model.lora import count_adapter_params

    overrides = list(SMOKE_OVERRIDES if smoke else [])
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        for seq in seqs:
            rows = max(1, tokens_per_step // seq)
            cfg = load(overrides, seq, rows)
            path = os.path.join(tmp, f"batches-{seq}.npz")
            write_batches(cfg, max(4, steps + 1), path)
            spec = {"overrides": overrides, "seq": seq, "rows": rows, "batches": path, "steps": steps, "rank": rank}
            runs = {kind: [] for kind in KINDS}
            for round_ in range(rounds):
                for kind in KINDS:
                    env = worker_env("jax" if kind.startswith("jax") else "torch", True, XLA_CPU_FLAGS)
                    result = run_worker(kind, spec, env)
                    runs[kind].append(result)
                    print(f"seq {seq}, round {round_ + 1}/{rounds}, {kind}: "
                          f"{result.error or f'{result.tokens_per_s:,.0f} tokens/s'}", file=sys.stderr, flush=True)
            rows_out.append((seq, [median_result(runs[k]) for k in KINDS]))
    lora_cfg = load([*overrides, *lora_overrides(rank)], seqs[0], 1)
    m = lora_cfg.model
    adapters = count_adapter_params(m, lora_cfg.lora)
    lines = [f"Model: {count_params(m) / 1e6:.1f}M parameters (D={m.hidden_size}, L={m.num_layers}, "
             f"F={m.intermediate_size}, V={m.vocab_size}), float32; LoRA rank {rank}, alpha {2 * rank}, all seven "
             f"projections: {adapters / 1e6:.2f}M trainable parameters ({adapters / count_params(m):.1%}); "
             f"{tokens_per_step:,} tokens per step; {steps} timed steps after one warm-up, {rounds} round(s), sides "
             f"taking turns (median); {len(os.sched_getaffinity(0))} CPU threads ({cpu_model()}); "
             f"GLIBC_TUNABLES={HUGEPAGES}; JAX XLA_FLAGS {XLA_CPU_FLAGS}.", "",
             "| seq | training step | tokens/s (median) | rounds (min–max) | vs JAX full | vs peft LoRA | "
             "first step (s) | peak RSS (MB) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for seq, results in rows_out:
        full, peft_ = results[0].tokens_per_s, results[2].tokens_per_s
        for r in results:
            if r.error:
                lines.append(f"| {seq} | {r.name} | {r.error} | | | | | |")
                continue
            vs_full = f"{r.tokens_per_s / full:.2f}×" if full else "-"
            vs_peft = f"{r.tokens_per_s / peft_:.2f}×" if peft_ else "-"
            lines.append(f"| {seq} | {r.name} | {r.tokens_per_s:,.0f} | {r.spread} | {vs_full} | {vs_peft} | "
                         f"{r.first_step_s:.1f} | {r.peak_rss_mb:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="512", help="comma-separated sequence lengths (default %(default)s)")
    p.add_argument("--tokens-per-step", type=int, default=2048, help="rows × seq per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="measurements per side, taking turns (default %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank; default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="toy model, short sequences: checks the benchmark runs")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, json.loads(args.spec))
        return
    seqs = [int(s) for s in args.seq.split(",")]
    if args.smoke:
        seqs = [max(16, s // 8) for s in seqs]
    print(benchmark(seqs, tokens_per_step=args.tokens_per_step // (8 if args.smoke else 1), steps=args.steps,
                    rounds=args.rounds, rank=args.rank, smoke=args.smoke))


if __name__ == "__main__":
    main()
