"""Training benchmark: our jitted train step vs PyTorch + transformers on the same model, batches and optimizer.

    python -m bench.bench_train                          # configs/bench.yaml (~58M parameters), seq 512, 1024, 2048
    python -m bench.bench_train --seq 1024 --steps 5     # one sequence length, more timed steps
    python -m bench.bench_train --smoke                  # a toy model, seconds long (checks the benchmark itself)

What is measured, per sequence length T (rows per step = tokens_per_step / T, packed from the pipeline's
sample data by agentlm_jax.data.iterator, identical batches on both sides):
  * a full optimizer step: forward, token-level mean cross-entropy over the loss tokens, backward, global-norm
    clipping at 1.0 and AdamW (β 0.9/0.95, weight decay 0.1 not on norms), float32 on both sides.
    JAX: `agentlm_jax.training.step.TrainStep`, as the trainer runs it (one jit, donated state, no host sync
    inside the timed steps). PyTorch: `transformers.LlamaForCausalLM` (SDPA attention, causal over the whole
    row: the same FLOPs as our segment-masked attention) + `torch.optim.AdamW` (foreach) + `clip_grad_norm_`,
    on all the cores this process may use.
  * tokens/s = rows × T × steps / wall time of the timed steps (after one warm-up step); first-step time
    (JAX: tracing + XLA compilation); peak host memory (the worker process's maximum resident set, and its
    growth over the timed steps).
  * MFU = tokens/s × model FLOPs per token / the float32 matmul peak of this machine (bench/matmul_peak.py),
    measured in the same run before each sequence length, the best measurement counting; FLOPs per token as
    agentlm_jax/training/metrics.py: 6·(parameters − embedding) + 6·L·T·D.
  * the input pipeline alone (no model): tokens/s it delivers, against what the JAX step consumes.
Each side runs in its own worker process (clean memory peaks, no thread pools shared between XLA and PyTorch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from agentlm_jax.data.packing import BATCH_KEYS

CONFIG = "configs/bench.yaml"
# glibc malloc on transparent huge pages: every step allocates hundreds of MB of fresh buffers, and on a VM
# their page faults cost as much as the arithmetic of an elementwise op (a 32 MB add: 16 ms -> 6 ms).
HUGEPAGES = "glibc.malloc.hugetlb=1"
# XLA:CPU runs dots through YNNPACK (XNNPACK's successor in jaxlib 0.10): on the bench config at seq 512,
# ~730 tokens/s with XNNPACK's dot,eltwise fusions (as with no flag) -> ~790 with YNNPACK dots.
XLA_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot"
SMOKE_OVERRIDES = ["model.vocab_size=1024", "model.hidden_size=64", "model.intermediate_size=160",
                   "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4", "loss.chunk_size=16"]


@dataclasses.dataclass
class Result:
    name: str
    tokens_per_s: float | None = None
    first_step_s: float | None = None
    peak_rss_mb: float | None = None
    step_rss_growth_mb: float | None = None
    error: str | None = None
    spread: str = ""  # tokens/s over the rounds, "min–max"


def load(overrides: list[str], seq: int, rows: int):
    from agentlm_jax.config import load_config

    return load_config(CONFIG, [*overrides, f"data.max_seq_len={seq}", f"data.global_batch={rows}"])


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- data, input
def write_batches(cfg, count: int, path: str) -> tuple[float, float]:
    """Pack `count` batches with the input pipeline into an .npz; returns the pipeline's tokens/s and the
    share of positions that carry loss."""
    from agentlm_jax.data import iterator
    from agentlm_jax.training.trainer import prepare_dataset

    prepare_dataset(cfg.data.path)
    it = iterator.train_iterator(cfg.data, seed=0, process_index=0, process_count=1)
    try:
        next(it)  # opening the files and the first packing group are not steady state
        start = time.perf_counter()
        batches = [next(it) for _ in range(count)]
        seconds = time.perf_counter() - start
    finally:
        it.close()
    np.savez(path, **{f"{i}/{k}": b[k] for i, b in enumerate(batches) for k in BATCH_KEYS})
    loss_share = float(np.mean([np.mean(b["loss_mask"] > 0) for b in batches]))
    return count * cfg.data.global_batch * cfg.data.max_seq_len / seconds, loss_share


def read_batches(path: str) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    count = len({k.split("/")[0] for k in data.files})
    return [{k: data[f"{i}/{k}"] for k in BATCH_KEYS} for i in range(count)]


# ----------------------------------------------------------------------------------------------- workers
def jax_worker(cfg, batches, steps: int) -> Result:
    import jax
    from flax import nnx

    from agentlm_jax.model.llama import init_model
    from agentlm_jax.sharding import batch_sharding, make_mesh
    from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from agentlm_jax.training.state import abstract_params, init_train_state, train_state_shardings
    from agentlm_jax.training.step import TrainStep

    mesh = make_mesh(cfg.mesh)
    optimizer = make_optimizer(cfg.optimizer, cfg.steps, abstract_params(cfg.model))
    shardings = train_state_shardings(cfg.model, optimizer, mesh, cfg.mesh.rules)
    params = nnx.state(init_model(cfg.model, seed=0, mesh=mesh, rules=cfg.mesh.rules), nnx.Param).to_pure_dict()
    state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=shardings, donate_argnums=0)(params)
    step = TrainStep(cfg.model, optimizer, learning_rate_schedule(cfg.optimizer, cfg.steps), mesh=mesh,
                     rules=cfg.mesh.rules, state_shardings=shardings, data=cfg.data, loss=cfg.loss)
    on_device = batch_sharding(mesh, cfg.mesh.rules)
    device_batches = [{k: jax.device_put(v, on_device) for k, v in b.items()} for b in batches]  # as the loop does
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
    return Result("JAX: agentlm_jax TrainStep (jit)", steps * tokens_per_batch(batches) / seconds, first, peak_rss_mb(),
                  peak_rss_mb() - before)


def torch_worker(cfg, batches, steps: int, compile_model: bool) -> Result:
    import torch
    import transformers

    from agentlm_jax.hf import hf_config

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(cfg.model, "float32")).float().train()
    o = cfg.optimizer
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.learning_rate,
                                  betas=(o.b1, o.b2), eps=o.eps)
    forward = torch.compile(model) if compile_model else model

    def train_step(b):
        logits = forward(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        labels = b["labels"].reshape(-1)
        # token-level mean as our step (a batch without loss tokens gives 0, not 0/0)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=-100,
                                                 reduction="sum") / (labels != -100).sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    name = "PyTorch + transformers, " + ("torch.compile" if compile_model else "eager")
    return time_torch_steps(train_step, to_torch_batches(batches), steps, name)


def to_torch_batches(batches) -> list[dict]:
    """Our packed batches as transformers' inputs: token and position ids, labels -100 where no loss."""
    import torch

    return [{"input_ids": torch.as_tensor(b["tokens"], dtype=torch.long),
             "position_ids": torch.as_tensor(b["positions"], dtype=torch.long),
             "labels": torch.as_tensor(np.where(b["loss_mask"] > 0, b["targets"], -100), dtype=torch.long)}
            for b in batches]


def time_torch_steps(train_step, batches, steps: int, name: str) -> Result:
    """One warm-up step (its time: first_step_s), then `steps` timed steps cycling through the (torch) `batches`:
    tokens/s, peak RSS and its growth over the timed steps; a non-finite last loss is an error."""
    import torch

    start = time.perf_counter()
    train_step(batches[0])
    first = time.perf_counter() - start
    before = rss_mb()
    start = time.perf_counter()
    for i in range(steps):
        loss = train_step(batches[(i + 1) % len(batches)])
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    tokens = int(np.prod(batches[0]["input_ids"].shape))
    return Result(name, steps * tokens / seconds, first, peak_rss_mb(), peak_rss_mb() - before)


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (the ratio to PyTorch differs between CPU models)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


def tokens_per_batch(batches) -> int:
    return int(np.prod(batches[0]["tokens"].shape))


def worker_env(kind: str, hugepages: bool, xla_flags: str) -> dict[str, str]:
    env = dict(os.environ)
    if hugepages:  # both sides: large buffers on transparent huge pages (far fewer page faults per step)
        env["GLIBC_TUNABLES"] = HUGEPAGES
    if kind == "jax" and xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    return env


def run_worker(kind: str, spec: dict, env: dict[str, str]) -> Result:
    """Run one side in a fresh process; a failure becomes a row with the error, not a crash."""
    cmd = [sys.executable, "-m", "bench.bench_train", "--worker", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return Result(kind, error=f"failed: {tail}")
    return Result(**json.loads(lines[-1]))


def median_result(runs: list[Result]) -> Result:
    """One row from several rounds of a side: the median tokens/s (its spread alongside), the first round's
    first-step time (later rounds hit warm caches), the largest memory figures; the first error if any failed."""
    ok = [r for r in runs if not r.error]
    if len(ok) < len(runs):
        return next(r for r in runs if r.error)
    speeds = sorted(r.tokens_per_s for r in ok)
    return dataclasses.replace(ok[0], tokens_per_s=statistics.median(speeds), peak_rss_mb=max(r.peak_rss_mb for r in ok),
                               step_rss_growth_mb=max(r.step_rss_growth_mb for r in ok),
                               spread=f"{speeds[0]:,.0f}–{speeds[-1]:,.0f}")


def worker_main(kind: str, spec: dict) -> None:
    cfg = load(spec["overrides"], spec["seq"], spec["rows"])
    batches = read_batches(spec["batches"])
    if kind == "jax":
        result = jax_worker(cfg, batches, spec["steps"])
    else:
        result = torch_worker(cfg, batches, spec["steps"], compile_model=kind == "torch-compile")
    print(json.dumps(dataclasses.asdict(result)), flush=True)


# ---------------------------------------------------------------------------------------------------- main
def benchmark(seqs: list[int], *, tokens_per_step: int, steps: int, smoke: bool, torch_compile: bool,
              rounds: int = 1, hugepages: bool = True, xla_flags: str = XLA_CPU_FLAGS, extra: list[str] = ()) -> str:
    from bench.matmul_peak import measure_matmul_peak

    overrides = [*(SMOKE_OVERRIDES if smoke else []), *extra]
    peak_sizes = (256, 512) if smoke else (1024, 2048, 3072)
    # The matmul peak is measured before each sequence length's rounds and the best is the MFU denominator:
    # the VM's speed drifts over the run, and a peak taken at one slow moment would flatter every MFU.
    peaks, measured = [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for seq in seqs:
            peaks.append(measure_matmul_peak(peak_sizes)["peak_flops"])
            rows = max(1, tokens_per_step // seq)
            cfg = load(overrides, seq, rows)
            path = os.path.join(tmp, f"batches-{seq}.npz")
            pipeline_tps, loss_share = write_batches(cfg, max(4, steps + 1), path)
            spec = {"overrides": overrides, "seq": seq, "rows": rows, "batches": path, "steps": steps}
            kinds = ["jax", "torch"] + (["torch-compile"] if torch_compile else [])
            # The sides take turns, `rounds` times, and each reports its median: on a shared VM the machine's
            # speed drifts by ±10 % over minutes, and alternating keeps the drift out of the ratio.
            runs = {kind: [] for kind in kinds}
            for round_ in range(rounds):
                for kind in kinds:
                    result = run_worker(kind, spec, worker_env(kind, hugepages, xla_flags))
                    runs[kind].append(result)
                    print(f"seq {seq}, round {round_ + 1}/{rounds}, {kind}: "
                          f"{result.error or f'{result.tokens_per_s:,.0f} tokens/s'}", file=sys.stderr, flush=True)
            measured.append((seq, cfg, [median_result(runs[kind]) for kind in kinds], pipeline_tps, loss_share))
    return format_report(measured, peaks, tokens_per_step=tokens_per_step, steps=steps, rounds=rounds,
                         hugepages=hugepages, xla_flags=xla_flags, extra=extra)


def format_report(measured, peaks: list[float], *, tokens_per_step: int, steps: int, rounds: int, hugepages: bool,
                  xla_flags: str, extra) -> str:
    """The Markdown tables from [(seq, cfg, [JAX, PyTorch, ...] results, pipeline tokens/s, loss share)]."""
    from agentlm_jax.training.metrics import flops_per_token
    from agentlm_jax.model.llama import count_params

    peak = max(peaks)
    m = measured[0][1].model
    lines = [f"Model: {count_params(m) / 1e6:.1f}M parameters (D={m.hidden_size}, L={m.num_layers}, "
             f"N={m.num_heads}, F={m.intermediate_size}, V={m.vocab_size}), float32, JAX attention_impl "
             f"{m.attention_impl} (auto: blockwise on CPU), overrides {extra or 'none'}; {tokens_per_step:,} tokens per "
             f"step (packed sample data); {len(os.sched_getaffinity(0))} CPU threads ({cpu_model()}); float32 matmul "
             f"peak {peak / 1e9:.1f} GFLOP/s (the best of {len(peaks)} measurements spread over the run: "
             f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}); {steps} timed steps after one warm-up step, {rounds} "
             f"rounds with the sides taking turns (median reported). Environment: "
             f"GLIBC_TUNABLES={HUGEPAGES if hugepages else '(unset)'} on both sides; JAX XLA_FLAGS "
             f"{xla_flags or '(none)'}.", "",
             "| seq | training step | tokens/s (median) | rounds (min–max) | vs PyTorch | MFU | first step (s) | "
             "peak RSS (MB) | RSS growth over steps (MB) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    pipeline_rows, head_notes = [], []
    for seq, cfg, results, pipeline_tps, loss_share in measured:
        fpt = flops_per_token(cfg.model, seq)
        reference = results[1].tokens_per_s
        for r in results:
            if r.error:
                lines.append(f"| {seq} | {r.name} | {r.error} | | | | | | |")
                continue
            ratio = f"{r.tokens_per_s / reference:.2f}×" if reference else "-"
            lines.append(f"| {seq} | {r.name} | {r.tokens_per_s:,.0f} | {r.spread} | {ratio} | "
                         f"{r.tokens_per_s * fpt / peak:.1%} | {r.first_step_s:.1f} | {r.peak_rss_mb:,.0f} | "
                         f"{r.step_rss_growth_mb:,.0f} |")
        step_tps = results[0].tokens_per_s
        if step_tps and cfg.loss.impl != "full" and cfg.loss.chunk_size:
            executed = fpt - 6 * cfg.model.hidden_size * cfg.model.vocab_size * (1 - loss_share)
            head_notes.append(f"seq {seq}: {loss_share:.0%} of positions carry loss, so JAX executes up "
                              f"to {1 - executed / fpt:.0%} fewer FLOPs per token than PyTorch (loss chunks "
                              f"round up), an MFU of at least {step_tps * executed / peak:.1%} on executed FLOPs")
        pipeline_rows.append(f"| {seq} | {pipeline_tps:,.0f} | {step_tps:,.0f} | {pipeline_tps / step_tps:,.0f}× |"
                             if step_tps else f"| {seq} | {pipeline_tps:,.0f} | - | - |")
    if head_notes:
        lines += ["", "MFU counts the model's FLOPs per token for both sides (the output head at every position). "
                  "The JAX step's chunked loss computes the head only at the loss positions (the same loss and "
                  "gradients), so part of its speed is work it skips: " + "; ".join(head_notes) + "."]
    lines += ["", "| seq | input pipeline alone (tokens/s) | JAX step consumes (tokens/s) | headroom |",
              "|---:|---:|---:|---:|", *pipeline_rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="512,1024,2048", help="comma-separated sequence lengths (default %(default)s)")
    p.add_argument("--tokens-per-step", type=int, default=2048, help="rows × seq per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measurements per side, taking turns; the median is reported (default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="toy model, short sequences: checks the benchmark runs")
    p.add_argument("--torch-compile", action="store_true", help="add a torch.compile row (slow to compile)")
    p.add_argument("--no-hugepages", action="store_true", help=f"do not set GLIBC_TUNABLES={HUGEPAGES} (both sides)")
    p.add_argument("--xla-flags", default=XLA_CPU_FLAGS, help="extra XLA_FLAGS for the JAX side (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for configs/bench.yaml, e.g. model.attention_impl=xla (repeatable; default: none)")
    p.add_argument("--worker", choices=("jax", "torch", "torch-compile"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args.worker, json.loads(args.spec))
        return
    seqs = [int(s) for s in args.seq.split(",")]
    if args.smoke:
        seqs = [s // 8 for s in seqs]
    print(benchmark(seqs, tokens_per_step=args.tokens_per_step // (8 if args.smoke else 1), steps=args.steps,
                    smoke=args.smoke, torch_compile=args.torch_compile, rounds=args.rounds,
                    hugepages=not args.no_hugepages,
                    xla_flags=args.xla_flags, extra=args.set))


if __name__ == "__main__":
    main()
