"""The train step on one GPU against PyTorch + transformers: a ~1B-parameter Llama in bf16, synthetic packed batches.

    python -m bench.device.gpu_train                 # the 1B model, seq 4096 (for an H100/H200; a few minutes)
    python -m bench.device.gpu_train --tiny          # a toy model on any device (checks the script itself)

Both sides train the same architecture on the same batches (rows of 4,096 tokens packed from random-length
"conversations", loss on ~40 % of the positions), AdamW (β 0.9/0.95, weight decay 0.1) with gradient clipping:

  * JAX: agentlm_jax's TrainStep as the trainer runs it (jit, donated state, bf16 compute, float32 master
    weights, `attention_impl: auto` = dot_product_attention with cuDNN where it can, the chunked masked loss);
  * PyTorch: `transformers.LlamaForCausalLM` in float32 with bf16 autocast, SDPA attention (flash where it can;
    causal over the whole row, so the same attention FLOPs as ours), fused AdamW, `clip_grad_norm_`, the loss on
    the same positions (labels -100 elsewhere).

Printed per side: tokens/s over the timed steps, MFU (model FLOPs per token, training/metrics.py, against the
bf16 matmul peak measured here), the first step's time (JAX: compile included), and peak device memory. No
network, no Beam or grain: everything is made in memory.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

ONE_B = ["model.vocab_size=32000", "model.hidden_size=2048", "model.intermediate_size=5632", "model.num_layers=16",
         "model.num_heads=16", "model.num_kv_heads=16", "model.max_position_embeddings=4096"]
TINY = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=4", "model.max_position_embeddings=256"]


def config(tiny: bool, rows: int, seq: int):
    from agentlm_jax.config import load_config

    return load_config(None, [*(TINY if tiny else ONE_B), "model.dtype=bfloat16", "model.remat=none",
                              f"data.global_batch={rows}", f"data.max_seq_len={seq}", "loss.impl=chunked",
                              f"loss.chunk_size={min(seq, 512)}", "optimizer.learning_rate=1e-4", "mesh.fsdp=1"])


def synthetic_batches(cfg, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Packed rows of random-length conversations (positions restart per conversation, loss on the answers)."""
    rng = np.random.default_rng(seed)
    rows, seq, vocab = cfg.data.global_batch, cfg.data.max_seq_len, cfg.model.vocab_size
    out = []
    for _ in range(count):
        b = {k: np.zeros((rows, seq), np.int32) for k in ("tokens", "targets", "loss_mask", "positions",
                                                           "segment_ids", "is_agent", "task_ids")}
        for r in range(rows):
            t, segment = 0, 1
            while t < seq:
                n = min(int(rng.integers(seq // 8, seq // 2)), seq - t)
                ids = rng.integers(3, vocab, n + 1)
                b["tokens"][r, t:t + n], b["targets"][r, t:t + n] = ids[:-1], ids[1:]
                b["loss_mask"][r, t + n // 2:t + n] = 1
                b["positions"][r, t:t + n], b["segment_ids"][r, t:t + n] = np.arange(n), segment
                t, segment = t + n, segment + 1
        out.append(b)
    return out


def bf16_matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def jax_side(cfg, batches, steps: int) -> dict:
    import jax
    from flax import nnx

    from agentlm_jax.model.llama import init_model
    from agentlm_jax.sharding import make_mesh
    from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from agentlm_jax.training.state import abstract_params, init_train_state, train_state_shardings
    from agentlm_jax.training.step import TrainStep

    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    optimizer = make_optimizer(cfg.optimizer, 100, abstract_params(cfg.model))
    shardings = train_state_shardings(cfg.model, optimizer, mesh, cfg.mesh.rules)
    params = nnx.state(init_model(cfg.model, mesh=mesh, rules=cfg.mesh.rules), nnx.Param).to_pure_dict()
    state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=shardings, donate_argnums=0)(params)
    step = TrainStep(cfg.model, optimizer, learning_rate_schedule(cfg.optimizer, 100), mesh=mesh,
                     rules=cfg.mesh.rules, state_shardings=shardings, data=cfg.data, loss=cfg.loss)
    device_batches = [jax.device_put(b) for b in batches]
    start = time.perf_counter()
    state, metrics = step(state, device_batches[0])
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, device_batches[(i + 1) % len(device_batches)])
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    return {"side": "JAX agentlm_jax TrainStep", "seconds": seconds, "first_step_s": first,
            "loss": float(metrics["loss"]), "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def torch_side(cfg, batches, steps: int) -> dict:
    import torch
    import transformers

    from agentlm_jax.hf import hf_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = hf_config(cfg.model, "float32")
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(device).train()
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=device == "cuda")

    def run(b):
        tokens = torch.as_tensor(b["tokens"], dtype=torch.long, device=device)
        labels = torch.as_tensor(np.where(b["loss_mask"] > 0, b["targets"], -100), dtype=torch.long, device=device)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    run(batches[0])
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
        loss = run(batches[(i + 1) % len(batches)])
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"side": "PyTorch + transformers (SDPA, bf16 autocast, fused AdamW)", "seconds": seconds,
            "first_step_s": first, "loss": float(loss), "peak_memory_gib": peak}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.device.gpu_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a toy model and rows of 256 (any device, seconds)")
    p.add_argument("--rows", type=int, default=None, help="rows per step (default 8; --tiny 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up step (default %(default)s)")
    p.add_argument("--skip-torch", action="store_true", help="the JAX side only")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    seq = 256 if args.tiny else 4096
    cfg = config(args.tiny, args.rows or (2 if args.tiny else 8), seq)
    batches = synthetic_batches(cfg, 4)
    from agentlm_jax.model.llama import count_params
    from agentlm_jax.training.metrics import flops_per_token

    peak = bf16_matmul_peak(1024 if args.tiny else 8192)
    tokens_per_step = cfg.data.global_batch * seq
    results = [jax_side(cfg, batches, args.steps)] + ([] if args.skip_torch else [torch_side(cfg, batches, args.steps)])
    per_token = flops_per_token(cfg.model, seq)
    print(f"model {count_params(cfg.model) / 1e6:,.1f}M parameters, {cfg.data.global_batch} x {seq} tokens per step, "
          f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s (measured)")
    print("| side | tokens/s | MFU | first step (s) | peak memory (GiB) | final loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        r["tokens_per_s"] = args.steps * tokens_per_step / r["seconds"]
        r["mfu"] = r["tokens_per_s"] * per_token / peak
        print(f"| {r['side']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['first_step_s']:.1f} | "
              f"{r['peak_memory_gib']:.1f} | {r['loss']:.3f} |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
