"""Evaluation benchmark: teacher-forced turns/s (suite `actions`) and DB episodes/s (suite `dbbench`) on CPU.

    python -m bench.bench_eval                          # configs/tiny.yaml's model shape, random weights
    python -m bench.bench_eval --model runs/tiny/hf     # a trained model
    python -m bench.bench_eval --smoke                  # seconds: a 1-layer model, 2 records per task
    python -m bench.bench_eval --in-loop [--repeats 3]  # + the share of the default training run in eval.*

The data is the bundled sample built by data_pipeline (its validation split: one record per agent task,
~16 scored turns) and the package's 10 dbbench items. Each measurement runs twice with the same shapes: the
first includes compilation, the second is the steady state (the number that scales). A random model never
stops early, so every turn generates its whole budget (min(max new tokens, gold length + 32)): the worst
case. The scripted dbbench row (gold answers, no model) is the SQLite environment's own cost.

`--in-loop` also runs the default training (`python -m agentlm_jax.train`: the tiny model on the bundled
sample, eval.* at its defaults) twice, with and without in-loop evaluation, and reports the share of the run's
wall time spent in it (Σ eval/seconds of metrics.jsonl / wall time), that plus the first step's slowdown (the
evaluation's programs compile in a thread beside the first step), and the wall-time difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from agentlm_jax.config import ModelConfig
from agentlm_jax.evaluation import actions, dbbench
from agentlm_jax.evaluation.lm import LM

TINY = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=1024)  # configs/tiny.yaml
SMOKE = ModelConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                    max_position_embeddings=1024)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _train(steps: int | None, overrides: list[str]) -> dict:
    run_dir = tempfile.mkdtemp(prefix="bench-in-loop-")
    cmd = [sys.executable, "-m", "agentlm_jax.train", f"run_dir={run_dir}", "export.enabled=false",
           "logging.progress_bar=false", *([f"steps={steps}"] if steps else []), *overrides]
    (proc, seconds) = _timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"wall": seconds, "steps": rows[-1]["step"], "evals": sum("eval/seconds" in r for r in rows),
            "first": next(r["first_step_s"] for r in rows if "first_step_s" in r),
            "in_eval": sum(r.get("eval/seconds", 0.0) for r in rows),
            "ahead": sum(r.get("eval/compile_seconds", 0.0) for r in rows)}


def in_loop_share(steps: int | None, overrides: list[str], repeats: int = 1) -> list[tuple]:
    """Rows: the default training run without and with in-loop evaluation, each in its own process, `repeats`
    pairs one after the other (medians). Charged to evaluation: Σ eval/seconds, and that plus what the first step
    (compiling the train step while the evaluation's programs compile in a thread beside it) took longer than
    without evaluation."""
    import statistics

    off, on = [], []
    for _ in range(repeats):
        off.append(_train(steps, overrides + ["eval.every_steps=-1"]))
        on.append(_train(steps, overrides))
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    share = [r["in_eval"] / r["wall"] for r in on]
    charged = [(r["in_eval"] + max(0.0, r["first"] - o["first"])) / r["wall"] for r, o in zip(on, off)]
    increase = [r["wall"] / o["wall"] - 1 for r, o in zip(on, off)]
    pairs = f" (median of {repeats} pairs; each: {', '.join(f'{x:.1%}' for x in share)})" if repeats > 1 else ""
    return [
        ("training, eval.* off", "-", on[0]["steps"], med(off, "wall")),
        ("  its first step (compilation included)", f"{med(off, 'first'):.1f} s", "", med(off, "first")),
        ("training, eval.* defaults", f"{statistics.median(share):.1%} of the run in eval{pairs}: "
         f"{on[0]['evals']} evaluations, {med(on, 'in_eval'):.1f} s; programs compiled ahead in "
         f"{med(on, 'ahead'):.1f} s", on[0]["steps"], med(on, "wall")),
        ("  its first step (compilation included)", f"{med(on, 'first'):.1f} s", "", med(on, "first")),
        ("in-loop evaluation: eval time + the first step's slowdown",
         f"{statistics.median(charged):.1%} of the run ({', '.join(f'{x:.1%}' for x in charged)})", "",
         statistics.median(c * r["wall"] for c, r in zip(charged, on))),
        ("in-loop evaluation: wall-time increase (noisy: training's own run-to-run spread)",
         ", ".join(f"{x:+.1%}" for x in increase), "",
         statistics.median(r["wall"] - o["wall"] for r, o in zip(on, off))),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model directory (default: random weights, tiny shape)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--in-loop", action="store_true", help="also measure the in-loop evaluation's share of the "
                   "default training run (runs it with and without)")
    p.add_argument("--repeats", type=int, default=1, help="--in-loop: pairs of runs (medians are reported)")
    args = p.parse_args(argv)
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer

    data = os.path.join(tempfile.mkdtemp(prefix="bench-eval-"), "data")
    subprocess.run([sys.executable, "-m", "data_pipeline.build", "--output", data], check=True, capture_output=True)
    records, _ = actions.read_split(data, "validation")
    tokenizer = load_tokenizer(SAMPLE_TOKENIZER_DIR)
    if args.model:
        from agentlm_jax.model_source import load_model

        cfg, model = load_model(args.model, show_progress=False)
        name = args.model
    else:
        from agentlm_jax.model.llama import count_params, init_model

        cfg = SMOKE if args.smoke else TINY
        model = init_model(cfg, seed=0)
        name = f"random, {count_params(cfg) / 1e6:.1f}M parameters"
    max_items = 1
    items, _ = dbbench.load_items(limit=4 if args.smoke else None)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        lm = LM(model, tokenizer, batch_size=batch)
        complete = lambda p, b, on_batch=None: lm.complete(p, max_new_tokens=b, on_batch=on_batch)
        for label in ("first (compile)", "steady"):
            result, seconds = _timed(lambda: actions.evaluate_actions(
                records, complete, lm.decode, max_items=max_items, max_new_tokens=args.max_new_tokens,
                max_length=lm.max_length, show_progress=False))
            turns = result["overall"]["scored_turns"]
            rows.append((f"actions, batch {batch}, {label}", f"{turns / seconds:.2f} turns/s", turns, seconds))
        for label in ("first (compile)", "steady"):
            result, seconds = _timed(lambda: dbbench.evaluate_dbbench(
                items, dbbench.model_respond(lm, max_new_tokens=args.max_new_tokens), show_progress=False))
            rows.append((f"dbbench, batch {batch}, {label}", f"{len(items) / seconds:.2f} episodes/s", len(items),
                         seconds))

    def gold(episodes):
        return ["Action: Operation\n```sql\n" + e.item.label[0] + "\n```" if e.item.is_mutation and e.rounds == 0
                else "Action: Answer\nFinal Answer: " + str(list(e.item.label)) for e in episodes]

    _, seconds = _timed(lambda: [dbbench.evaluate_dbbench(items, gold, show_progress=False) for _ in range(20)])
    rows.append(("dbbench, scripted gold agent (SQLite only)", f"{20 * len(items) / seconds:.0f} episodes/s",
                 20 * len(items), seconds))
    if args.in_loop:
        rows += in_loop_share(10 if args.smoke else None, ["eval.every_steps=5"] if args.smoke else [],
                              repeats=args.repeats)
    print(f"\nModel: {name}; {os.cpu_count()} CPUs visible; max new tokens {args.max_new_tokens}\n")
    print("| measurement | rate | items | seconds |\n|---|---:|---:|---:|")
    for what, rate, n, seconds in rows:
        print(f"| {what} | {rate} | {n} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
