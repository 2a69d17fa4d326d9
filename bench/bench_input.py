"""Input-pipeline benchmark: packed training batches per second from TFRecord shards, on this CPU.

    python -m bench.bench_input                          # data/sample (built if missing) x10, seq 512/1024/2048
    python -m bench.bench_input --data DIR --scale 1     # an existing dataset dir, local or gs://
    python -m bench.bench_input --train-tokens-per-s 30000   # adds the ratio to the train step's consumption
    python -m bench.bench_input --size smoke             # seconds-long smoke run

The dataset is the pipeline's (`data_pipeline.build`'s sample, built when missing); `--scale N` writes a copy
whose train split repeats every record N times (raw TFRecord payloads, re-framed), so indexing and reading
work on a dataset of realistic size. If the pipeline's builder is not importable, synthetic records with
agent/chat-like length distributions are written instead (the table says which).

Per sequence length, the table gives:
  startup      seconds to list and index the shards (headers only)
  first batch  seconds from the iterator's creation to the first batch
  slots/s      batch positions delivered per second (batch x seq), what the train step consumes
  tokens/s     of them, real (non-padding) tokens per second
  packed       real tokens / positions with first-fit packing (the rest is padding)
  unpacked     the same with one conversation per row (what padding to max_seq_len would give)
  truncated    conversations longer than seq + 1 tokens (truncated; their share of those read)
Throughput is measured after the first batch, pulling batches as fast as the pipeline makes them (its own
background prefetch included), single process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import fsspec
import numpy as np

from agentlm_jax.config import DataConfig
from agentlm_jax.data import iterator
from agentlm_jax.data.dataset import TFRecordSource, split_files
from data_pipeline import SAMPLE_DATASET_DIR, build_sample_dataset
from data_pipeline.formats import records

SIZES = {
    "bench": dict(seqs=(512, 1024, 2048), host_batch=8, batches=100, scale=10, synthetic=4000),
    "smoke": dict(seqs=(128, 256), host_batch=4, batches=5, scale=2, synthetic=200),
}


def sample_dataset(synthetic_records: int) -> tuple[str, str]:
    """(dataset dir, description): the pipeline's sample dataset, else a synthetic one."""
    try:
        import apache_beam  # noqa: F401  (what building the sample needs)
    except ImportError:
        root = f"data/bench-input-synthetic-{synthetic_records}"
        if not os.path.exists(f"{root}/{records.MANIFEST_NAME}"):
            write_synthetic_dataset(root, synthetic_records)
        return root, f"synthetic ({synthetic_records} conversations; apache-beam not installed)"
    if not os.path.exists(f"{SAMPLE_DATASET_DIR}/{records.MANIFEST_NAME}"):
        logging.info("building the sample dataset in %s", SAMPLE_DATASET_DIR)
        build_sample_dataset(SAMPLE_DATASET_DIR)
    return SAMPLE_DATASET_DIR, f"data_pipeline sample ({SAMPLE_DATASET_DIR})"


def write_synthetic_dataset(root: str, count: int, seed: int = 0) -> None:
    """Conversations with log-normal lengths: agent trajectories (median ~1,500 tokens) and chat (~600)."""
    rng = np.random.default_rng(seed)
    tasks = ["alfworld", "db", "os", "sharegpt", "webshop"]
    recs = []
    for n in range(count):
        task = tasks[n % len(tasks)]
        median = 600 if task == "sharegpt" else 1500
        length = int(np.clip(rng.lognormal(np.log(median), 0.8), 16, 16384))
        mask = (rng.random(length) < 0.4).astype(np.int32)
        recs.append(records.Record(rng.integers(3, 32000, length, dtype=np.int32), mask,
                                   "general" if task == "sharegpt" else "agent", task, f"synthetic-{n}"))
    os.makedirs(root, exist_ok=True)
    shards = 4
    for i in range(shards):
        with open(f"{root}/{records.shard_filename('train', i, shards)}", "wb") as f:
            records.write_tfrecord(f, (records.encode_example(r) for r in recs[i::shards]))
    with open(f"{root}/{records.MANIFEST_NAME}", "w") as f:
        json.dump({"tasks": tasks}, f)


def scaled_copy(data_dir: str, scale: int, out_dir: str) -> str:
    """A dataset dir whose train split holds every train record `scale` times (same manifest)."""
    if scale == 1:
        return data_dir
    if os.path.exists(f"{out_dir}/{records.MANIFEST_NAME}"):
        return out_dir
    payloads = []
    for path in split_files(data_dir, "train"):
        with fsspec.open(path, "rb") as f:
            payloads.extend(records.iter_tfrecord(f, path))
    os.makedirs(out_dir, exist_ok=True)
    shards = 8
    for i in range(shards):
        with open(f"{out_dir}/{records.shard_filename('train', i, shards)}", "wb") as f:
            records.write_tfrecord(f, (payloads[j % len(payloads)] for j in range(i, len(payloads) * scale, shards)))
    with fsspec.open(f"{data_dir}/{records.MANIFEST_NAME}", "rb") as src, open(
            f"{out_dir}/{records.MANIFEST_NAME}", "wb") as dst:
        dst.write(src.read())
    return out_dir


def measure(data_dir: str, seq: int, host_batch: int, batches: int) -> dict[str, float]:
    t0 = time.perf_counter()
    source = TFRecordSource(split_files(data_dir, "train"))
    startup = time.perf_counter() - t0
    del source
    t0 = time.perf_counter()
    it = iterator.train_iterator(DataConfig(path=data_dir, global_batch=host_batch, max_seq_len=seq), seed=0,
                                 process_index=0, process_count=1)
    next(it)
    first = time.perf_counter() - t0
    real = conversations = unpacked_real = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        lengths = np.bincount((batch["segment_ids"] + np.arange(host_batch)[:, None] * (seq + 1)).ravel())
        real += int((batch["segment_ids"] > 0).sum())
        seg_lengths = lengths[np.arange(len(lengths)) % (seq + 1) != 0]
        seg_lengths = seg_lengths[seg_lengths > 0]
        conversations += len(seg_lengths)
        unpacked_real += int(seg_lengths.sum())
    elapsed = time.perf_counter() - t0
    counts = it.counts
    it.close()
    slots = batches * host_batch * seq
    return dict(startup=startup, first=first, slots_per_s=slots / elapsed, tokens_per_s=real / elapsed,
                packed=real / slots, unpacked=unpacked_real / (conversations * seq),
                truncated=counts["truncated"] / max(1, counts["read"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_input", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="bench", help="the defaults of the options below: bench "
                   f"{SIZES['bench']}, smoke {SIZES['smoke']} (default %(default)s)")
    p.add_argument("--data", help="dataset dir (local or gs://); default: the pipeline's sample")
    p.add_argument("--scale", type=int, help="repeat the train records this many times (local copy; default: "
                   "--size's scale)")
    p.add_argument("--seq", type=int, nargs="+", help="max_seq_len values (default: --size's seqs)")
    p.add_argument("--host-batch", type=int, help="rows per batch (default: --size's host_batch)")
    p.add_argument("--batches", type=int, help="batches timed per sequence length (default: --size's batches)")
    p.add_argument("--train-tokens-per-s", type=float,
                   help="the train step's tokens/s (bench_model); adds the input/consumption ratio (default: none)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("agentlm_jax.data.packing").setLevel(logging.ERROR)  # the table counts truncations
    size = SIZES[args.size]
    seqs = args.seq or size["seqs"]
    host_batch = args.host_batch or size["host_batch"]
    batches = args.batches or size["batches"]
    scale = args.scale or size["scale"]

    if args.data:
        data_dir, what = args.data, args.data
    else:
        data_dir, what = sample_dataset(size["synthetic"])
    if scale > 1:
        data_dir = scaled_copy(data_dir, scale, f"data/bench-input-x{scale}-{os.path.basename(data_dir)}")
    num_records = len(TFRecordSource(split_files(data_dir, "train")))

    print(f"\nInput pipeline: {what}, train split x{scale} = {num_records} conversations ({data_dir}); "
          f"host batch {host_batch}, {batches} batches timed, {os.cpu_count()} CPUs\n")
    ratio = args.train_tokens_per_s
    header = ["seq", "startup s", "first batch s", "slots/s", "tokens/s", "packed", "unpacked", "truncated"]
    if ratio:
        header.append("slots/s ÷ train step")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for seq in seqs:
        m = measure(data_dir, seq, host_batch, batches)
        row = [str(seq), f"{m['startup']:.2f}", f"{m['first']:.2f}", f"{m['slots_per_s']:,.0f}",
               f"{m['tokens_per_s']:,.0f}", f"{m['packed']:.1%}", f"{m['unpacked']:.1%}", f"{m['truncated']:.1%}"]
        if ratio:
            row.append(f"{m['slots_per_s'] / ratio:.1f}×")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
