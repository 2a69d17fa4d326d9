"""Chat-template benchmark: the pipeline with a Jinja template (`--chat-template hf`, whose loss mask is checked
against transformers on every record) versus the Llama 2 path and versus `datasets.map` doing the rendering alone.

    python -m bench.bench_templates                       # 10k conversations, the Llama 3 fixture tokenizer
    python -m bench.bench_templates --tokenizer DIR       # a real tokenizer directory with its chat_template
    python -m bench.bench_templates --sizes 2000 --repeat 1

Input: the bundled sample's conversations that the pipeline keeps (bench_pipeline.sample_conversations), or those
of `--input` (e.g. 2,000 real ShareGPT conversations), repeated
with fresh ids to N conversations in one JSONL file; the same conversations as OpenAI `messages` (no system
message, as the hf build renders them) for `datasets.map`.

  datasets.map    `datasets.load_dataset("json")` + `Dataset.map(batched=True)` calling
                  `tokenizer.apply_chat_template(batch["messages"], tokenize=True)`: rendering and tokenizing
                  only, no loss mask (what a user writes with transformers alone), one process, in memory.
  Beam hf         `python -m data_pipeline.build --chat-template hf` at η = 1: read, validate, render, derive and
                  check the mask on every record (docs/data_pipeline.md, "Chat templates"), mix, write shards.
  Beam llama2     the same build with the Llama 2 template (chat_template.py), for scale.
  Beam unchecked  (`--unchecked`, in_memory only) the hf build with its encoder replaced by
                  `apply_chat_template(tokenize=True)` alone, every token trained: no mask derivation, no check.
                  Not a usable build: the bound that any check of the hf build stays under (the rest is the
                  pipeline's own work: read, validate, mix, write shards).
Both Beam runs: DirectRunner `--mode` (in_memory, 2 worker threads, the default; or multi_processing). Wall-clock seconds, tokenizer loading
included, the median of `--repeat` interleaved runs (each run of each side in the JSON line, with the load
average); `--max-seq-len` is large enough that nothing is truncated, and the
hf build and datasets.map must produce the same number of tokens (checked). The default tokenizer is the Llama 3
style byte-level BPE the tests use (tests/data_pipeline/hf_fixtures.py) with data_pipeline/templates/llama3.jinja.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time

from bench.bench_pipeline import run_beam, sample_conversations, write_scaled


def write_messages(rows: list[dict], n: int, path: str, system_prompt: str) -> None:
    with open(path, "w") as f:
        for i in range(n):
            turns = rows[i % len(rows)]["conversations"]
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            for u, a in zip(turns[::2], turns[1::2]):
                messages += [{"role": "user", "content": u["value"]}, {"role": "assistant", "content": a["value"]}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def run_datasets_map(path: str, tokenizer_dir: str, batch_size: int) -> tuple[float, int]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def render(batch):
        return {"input_ids": tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=False)}

    ds = datasets.load_dataset("json", data_files=path, split="train", keep_in_memory=True)
    ds = ds.map(render, batched=True, batch_size=batch_size, remove_columns=ds.column_names, keep_in_memory=True)
    seconds = time.perf_counter() - start
    return seconds, sum(len(x) for x in ds["input_ids"])


@contextlib.contextmanager
def unchecked_hf_encoder():
    """The hf build's encoder as `apply_chat_template(tokenize=True)` alone (the `--unchecked` side)."""
    from data_pipeline.formats.chat_template import Encoded
    from data_pipeline.formats.hf_template import TemplateEncoder

    def encode_batch(self, conversations):
        if any(tools for _, _, *tools in conversations if tools and tools[0]):
            raise ValueError("--unchecked: records with tools are not supported")
        messages = [self.messages(list(pairs), system) for pairs, system, *_ in conversations]
        ids = self.tokenizer.apply_chat_template(messages, chat_template=self.text, tokenize=True, return_dict=False)
        return [Encoded(list(i), [1] * len(i), len(pairs), 0) for i, (pairs, *_) in zip(ids, conversations)]

    checked = TemplateEncoder.encode_batch
    TemplateEncoder.encode_batch = encode_batch
    try:
        yield
    finally:
        TemplateEncoder.encode_batch = checked


def without_special_token_text(rows: list[dict], tokenizer_dir: str) -> list[dict]:
    from transformers import AutoTokenizer

    from data_pipeline.formats import hf_template

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = hf_template.TemplateEncoder(tok, hf_template.resolve_template("hf", tokenizer_dir))
    return [r for r in rows if not any(encoder.special_token_text(t["value"]) for t in r["conversations"])]


def default_tokenizer(workdir: str) -> str:
    from tests.data_pipeline import hf_fixtures

    return hf_fixtures.make_tokenizer_dir(os.path.join(workdir, "llama3-tokenizer"),
                                          hf_fixtures.template_text("llama3.jinja"), "llama3.jinja")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.bench_templates", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000", help="comma-separated conversation counts (default %(default)s)")
    p.add_argument("--input", help="a ShareGPT/AgentInstruct JSONL file whose kept conversations are the records "
                   "(default: the bundled sample's), e.g. ../shared/data/sharegpt_v3_first2000.jsonl")
    p.add_argument("--tokenizer", help="tokenizer directory with a chat_template (default: the Llama 3 fixture)")
    p.add_argument("--max-seq-len", type=int, default=1 << 20, help="the pipeline's --max-seq-len (default: no "
                   "truncation)")
    p.add_argument("--batch-size", type=int, default=256, help="records per batch on both sides (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each side; the median counts (default %(default)s)")
    p.add_argument("--mode", default="in_memory", help="Beam DirectRunner mode of both builds (in_memory, the "
                   "default: 2 worker threads; multi_processing: 2 worker processes)")
    p.add_argument("--unchecked", action="store_true", help="also time the hf build with apply_chat_template alone "
                   "as its encoder (no mask, no check: the bound for the checked build; in_memory mode only)")
    p.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temp dir)")
    args = p.parse_args(argv)
    if args.unchecked and args.mode != "in_memory":
        p.error("--unchecked patches the encoder in this process: only with --mode in_memory")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import apache_beam  # noqa: F401  (imports are not what we time)
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    import data_pipeline.beam_pipeline  # noqa: F401

    rows = sample_conversations(args.input)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-templates-", dir=args.workdir) as tmp:
        tokenizer = args.tokenizer or default_tokenizer(tmp)
        rows = without_special_token_text(rows, tokenizer)  # (the pipeline rejects those: special_token_text)
        for n in (int(s) for s in args.sizes.split(",")):
            records, messages = os.path.join(tmp, f"convs-{n}.jsonl"), os.path.join(tmp, f"messages-{n}.jsonl")
            write_scaled(rows, n, records)
            write_messages(rows, n, messages, None)  # (as the hf build: no default system prompt for a Jinja template)
            sides = ("hf", "llama2") + (("unchecked",) if args.unchecked else ())
            times: dict[str, list[float]] = {"datasets_s": []} | {f"beam_{side}_s": [] for side in sides}
            for _ in range(args.repeat):  # interleaved, so that a busy spell hits every side alike
                seconds, ds_tokens = run_datasets_map(messages, tokenizer, args.batch_size)
                times["datasets_s"].append(seconds)
                for side in sides:
                    with unchecked_hf_encoder() if side == "unchecked" else contextlib.nullcontext():
                        seconds, tokens, kept = run_beam(records, tokenizer, args.max_seq_len, args.mode, 2,
                                                         os.path.join(tmp, f"out-{n}-{side}"), args.batch_size,
                                                         chat_template="llama2" if side == "llama2" else "hf")
                    if kept != n or (side != "llama2" and tokens != ds_tokens):
                        raise AssertionError(f"{side}: kept {kept} of {n}, {tokens} tokens; datasets.map "
                                             f"{ds_tokens} tokens")
                    times[f"beam_{side}_s"].append(seconds)
            result = {"conversations": n, "tokens": ds_tokens} | {k: statistics.median(v) for k, v in times.items()}
            results.append(result)
            rounds = {f"datasets_over_{t}_per_run": [round(d / b, 3) for d, b in
                                                     zip(times["datasets_s"], times[f"beam_{t}_s"])]
                      for t in sides}  # (runs of each side in the same spell of load)
            print(json.dumps(result | {"all_runs_s": times} | rounds | {"load_average": os.getloadavg()}), flush=True)
    print(f"Beam: DirectRunner {args.mode}, 2 workers; median of {args.repeat} interleaved runs; load average at the "
          f"end {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(markdown_table(results))
    return results


def markdown_table(results: list[dict]) -> str:
    unchecked = all("beam_unchecked_s" in r for r in results)
    head = ["conversations", "tokens", "datasets.map + apply_chat_template rec/s", "Beam hf (checked) rec/s",
            "Beam hf / datasets.map", "Beam llama2 rec/s", "Beam hf / Beam llama2"]
    head += ["Beam unchecked rec/s", "unchecked / datasets.map"] if unchecked else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        n, ds, hf, l2 = r["conversations"], r["datasets_s"], r["beam_hf_s"], r["beam_llama2_s"]
        line = (f"| {n:,} | {r['tokens']:,} | {n / ds:,.0f} | {n / hf:,.0f} | {ds / hf:.2f}x | {n / l2:,.0f} "
                f"| {l2 / hf:.2f}x |")
        if unchecked:
            line += f" {n / r['beam_unchecked_s']:,.0f} | {ds / r['beam_unchecked_s']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
