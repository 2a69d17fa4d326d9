"""Preprocessing benchmark: the Beam pipeline versus a plain single-process `datasets.map`.

    python -m bench.bench_pipeline                                # 1k, 10k, 40k conversations, tiny tokenizer
    python -m bench.bench_pipeline --tokenizer $AGENTLM_LLAMA2_TOKENIZER   # the real Llama 2 tokenizer
    python -m bench.bench_pipeline --sizes 10000 --repeat 1       # one size, one run of each side

Input: the bundled sample's conversations that the pipeline keeps (AgentInstruct format: agent trajectories
with their `loss` flags, ShareGPT chats), repeated with fresh ids to N conversations in one JSONL file.

  datasets.map   `datasets.load_dataset("json")` + `Dataset.map(batched=True)` in one process, doing the same
                 tokenize + mask (the same ChatEncoder: one batched fast-tokenizer call per batch, which uses
                 every core); caching off, in memory. This is what a user would write without a pipeline.
  Beam           the whole `python -m data_pipeline.build` run on that file with η = 1 (every conversation
                 is kept): read, validate, de-duplicate, tokenize + mask, mix, split, write TFRecord shards
                 and the manifest. DirectRunner with 2 workers in each `--modes` mode: in_memory (the
                 default: worker threads in this process) and multi_processing (worker processes).
Times are wall-clock seconds from the start of each run to its end, tokenizer loading included on both
sides and Beam's worker start-up and shutdown included; the best of `--repeat` runs, the two sides
interleaved so that a busy spell on a shared machine hits both. Both must produce the same number of tokens
(checked). Records/s = conversations / seconds; tokens/s = output tokens / seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time


log = logging.getLogger("bench_pipeline")


def sample_conversations(path: str | None = None) -> list[dict]:
    """The sample records the pipeline keeps (or those of a ShareGPT/AgentInstruct JSONL file), in AgentInstruct
    format (human/gpt turns with `loss`)."""
    from data_pipeline.config import PipelineConfig, SourceConfig
    from data_pipeline.normalize import Conversation, normalize
    from data_pipeline.sources import ReadTask, read_task

    cfg = PipelineConfig()
    sources = [(s, "agent") for s in cfg.agent] + [(s, "general") for s in cfg.general]
    if path:
        sources = [(SourceConfig(path, "input", "jsonl"), "general")]
    out = []
    for src, kind in sources:
        fmt = "jsonl" if src.path.endswith(".jsonl") else "json"
        for item in read_task(ReadTask(src.name, kind, src.path, fmt)):
            conv, _ = normalize(item, src.name, kind, cfg.reward_threshold)
            if isinstance(conv, Conversation):
                turns = []
                for p in conv.pairs:
                    turns += [{"from": "human", "loss": None, "value": p.user},
                              {"from": "gpt", "loss": p.loss, "value": p.assistant}]
                out.append({"id": conv.id, "task": conv.task, "conversations": turns})
    return out


def write_scaled(rows: list[dict], n: int, path: str) -> None:
    with open(path, "w") as f:
        for i in range(n):
            row = rows[i % len(rows)]
            f.write(json.dumps({**row, "id": f"{row['id']}_r{i // len(rows)}"}, ensure_ascii=False) + "\n")


def run_datasets_map(path: str, tokenizer_path: str, max_seq_len: int, batch_size: int) -> tuple[float, int]:
    import datasets

    from data_pipeline.formats.chat_template import DEFAULT_SYSTEM_PROMPT, ChatEncoder, Pair
    from data_pipeline.formats.tokenizer import load_tokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    start = time.perf_counter()
    encoder = ChatEncoder(load_tokenizer(tokenizer_path), max_seq_len)

    def encode(batch):
        convs = []
        for turns in batch["conversations"]:
            pairs = [Pair(u["value"], a["value"], a["loss"] is not False) for u, a in zip(turns[::2], turns[1::2])]
            convs.append((pairs, DEFAULT_SYSTEM_PROMPT))
        encoded = [e for e in encoder.encode_batch(convs) if not isinstance(e, str)]
        return {"input_ids": [e.input_ids for e in encoded], "loss_mask": [e.loss_mask for e in encoded]}

    ds = datasets.load_dataset("json", data_files=path, split="train", keep_in_memory=True)
    ds = ds.map(encode, batched=True, batch_size=batch_size, remove_columns=ds.column_names, keep_in_memory=True)
    seconds = time.perf_counter() - start  # counting the tokens is the benchmark's work, not the user's
    return seconds, sum(len(x) for x in ds["input_ids"])


def run_beam(path: str, tokenizer_path: str, max_seq_len: int, mode: str, workers: int, output: str,
             batch_size: int = 256, chat_template: str = "llama2"):
    from data_pipeline.build import run
    from data_pipeline.config import PipelineConfig, SourceConfig

    cfg = PipelineConfig(agent=(SourceConfig(path, "bench", "jsonl"),), general=(), general_weights=(), eta=1.0,
                         tokenizer=tokenizer_path, max_seq_len=max_seq_len, validation_fraction=0.0,
                         num_shards=8, output=output, tokenize_batch_size=batch_size, chat_template=chat_template)
    start = time.perf_counter()
    manifest = run(cfg, ["--runner=DirectRunner", f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"],
                   overwrite=True)  # --repeat rebuilds into the same directory
    seconds = time.perf_counter() - start
    return seconds, sum(s["tokens"] for s in manifest["splits"].values()), manifest["totals"]["kept"]


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR

    p = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,40000", help="comma-separated conversation counts "
                   "(default %(default)s)")
    p.add_argument("--tokenizer", default=SAMPLE_TOKENIZER_DIR, help="tokenizer directory (default: the bundled "
                   "tiny tokenizer)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="the pipeline's --max-seq-len (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="Beam workers (threads, or processes in "
                   "multi_processing; default %(default)s)")
    p.add_argument("--modes", default="in_memory,multi_processing", help="Beam DirectRunner modes, "
                   "comma-separated (in_memory, multi_threading, multi_processing; default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="records per batch: datasets.map's and the "
                   "pipeline's --tokenize-batch-size (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each side per size; the best counts "
                   "(default %(default)s)")
    p.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temp dir)")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modes = [m for m in args.modes.split(",") if m]
    import apache_beam  # noqa: F401  (imports are not what we time: both sides start with them loaded)
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    import data_pipeline.beam_pipeline  # noqa: F401
    rows = sample_conversations()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-", dir=args.workdir) as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            path = os.path.join(tmp, f"convs-{n}.jsonl")
            write_scaled(rows, n, path)
            times: dict[str, list[float]] = {"datasets_s": []} | {f"beam_{m}_s": [] for m in modes}
            for _ in range(args.repeat):  # interleaved, so that a busy spell hits both sides alike
                seconds, ds_tokens = run_datasets_map(path, args.tokenizer, args.max_seq_len, args.batch_size)
                times["datasets_s"].append(seconds)
                for mode in modes:
                    seconds, tokens, kept = run_beam(path, args.tokenizer, args.max_seq_len, mode, args.workers,
                                                     os.path.join(tmp, f"out-{n}-{mode}"), args.batch_size)
                    if tokens != ds_tokens:
                        raise AssertionError(f"Beam produced {tokens} tokens, datasets.map {ds_tokens}")
                    times[f"beam_{mode}_s"].append(seconds)
            result = {"conversations": n, "tokens": ds_tokens} | {k: min(v) for k, v in times.items()}
            results.append(result)
            print(json.dumps(result | {"all_runs_s": times, "load_average": os.getloadavg()}), flush=True)
    print(markdown_table(results, modes, args.workers, os.path.basename(os.path.normpath(args.tokenizer))))
    return results


def markdown_table(results: list[dict], modes: list[str], workers: int, tokenizer: str) -> str:
    head = ["conversations", "tokens", "datasets.map rec/s", "datasets.map tok/s"]
    for mode in modes:
        label = f"Beam {mode} ({workers} workers)"
        head += [f"{label} rec/s", f"{label} tok/s", f"{label} / datasets.map"]
    lines = [f"tokenizer: {tokenizer}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        n, tokens, ds = r["conversations"], r["tokens"], r["datasets_s"]
        cells = [f"{n:,}", f"{tokens:,}", f"{n / ds:,.0f}", f"{tokens / ds:,.0f}"]
        for mode in modes:
            s = r[f"beam_{mode}_s"]
            cells += [f"{n / s:,.0f}", f"{tokens / s:,.0f}", f"{ds / s:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
