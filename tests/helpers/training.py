"""Shared pieces of the trainer tests: a tiny model, a small dataset, configs, and the fixtures `compilation_cache`
and `gcs` (registered by tests/conftest.py).

The dataset's conversations are arithmetic token sequences (learnable, so the loss falls); the first third
of each is prompt (loss 0), the rest answer (loss 1). Records alternate between agent tasks and a general one.
"""

from __future__ import annotations

import json
import os

import fsspec
import jax
import numpy as np
import pytest

from agentlm_jax.config import ModelConfig, load_config, to_dict
from data_pipeline.formats import records
from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, tokenizer_files_sha256

VOCAB = 1024  # = the bundled sample tokenizer's, so a run can export it
TASKS = ["db", "os", "sharegpt"]
TINY_MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=128)
SEQ = 64
BATCH = 8


def tiny_model_overrides() -> list[str]:
    return [f"model.{k}={v}" for k, v in vars(TINY_MODEL).items() if k in
            ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "max_position_embeddings")]


def make_records(split: str, count: int, seed: int) -> list[records.Record]:
    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        length = int(rng.integers(6, SEQ + 10))  # a few are longer than a row: truncated
        start, stride = int(rng.integers(3, VOCAB)), int(rng.integers(1, 4))
        ids = ((start + stride * np.arange(length)) % (VOCAB - 3) + 3).astype(np.int32)
        mask = (np.arange(length) >= length // 3).astype(np.int32)
        task = TASKS[n % len(TASKS)]
        out.append(records.Record(ids, mask, "general" if task == "sharegpt" else "agent", task, f"{split}-{n}"))
    return out


def write_dataset(root: str, *, train: int = 240, validation: int = 24,
                  tokenizer_path: str | None = SAMPLE_TOKENIZER_DIR) -> str:
    """Shards + manifest under `root` (a local path or gs:// URL); returns root. The manifest names the bundled
    sample tokenizer (same vocabulary), as the trainer loads the dataset's tokenizer at start-up."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    for split, recs, shards in (("train", make_records("train", train, 0), 2),
                                ("validation", make_records("validation", validation, 1), 1)):
        for i in range(shards):
            with fs.open(f"{path}/{records.shard_filename(split, i, shards)}", "wb") as f:
                records.write_tfrecord(f, (records.encode_example(r) for r in recs[i::shards]))
    tokenizer = {"vocab_size": VOCAB}
    if tokenizer_path:
        tokenizer.update(path=tokenizer_path, sha256=tokenizer_files_sha256(tokenizer_path))
    with fs.open(f"{path}/{records.MANIFEST_NAME}", "w") as f:
        json.dump({"tasks": TASKS, "tokenizer": tokenizer}, f)
    return root


def tiny_config(data_dir: str, run_dir: str, *overrides: str):
    """A tiny 8-device (fsdp) run: every step logged, checkpoints every 2 steps, no export or in-loop
    evaluation unless asked."""
    return load_config(None, [*tiny_model_overrides(), f"data.path={data_dir}", f"run_dir={run_dir}",
                              f"data.global_batch={BATCH}", f"data.max_seq_len={SEQ}", "steps=6",
                              "optimizer.learning_rate=1e-2", "checkpoint.every_steps=2", "checkpoint.keep=2",
                              "logging.every_steps=1", "logging.eval_every_steps=3", "logging.eval_batches=2",
                              "logging.progress_bar=false", "logging.peak_flops_per_device=1e9",
                              "export.enabled=false", "eval.every_steps=-1", *overrides])


def tiny_config_args(data_dir, run_dir) -> list[str]:
    """`tiny_config` as command-line overrides."""
    cfg = to_dict(tiny_config(data_dir, run_dir))
    args = []
    for section in ("model", "data", "optimizer", "checkpoint", "logging", "export", "eval"):
        args += [f"{section}.{k}={'null' if v is None else v}" for k, v in cfg[section].items()]
    return args + [f"run_dir={run_dir}", f"steps={cfg['steps']}"]


def metrics(run_dir) -> list[dict]:
    with fsspec.open(f"{run_dir}/metrics.jsonl", "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """A persistent XLA compilation cache for these tests (and their subprocesses, via `env`): the trainer
    tests build the same programs several times (reference run, interrupted run, resumed run)."""
    path = str(tmp_path_factory.getbasetemp() / "jax-compilation-cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (path, 0, 0)):
        jax.config.update(name, value)
    env = {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    yield {**os.environ, **env}
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def gcs():
    """`gs://agentlm-test` on a gcp-storage-emulator of this module's own (conftest's `gcs_bucket` is one for
    the whole session; a training run makes many requests, and its own emulator keeps modules apart)."""
    from tests.helpers.gcs_emulator import running_emulator

    with running_emulator() as url:
        yield url
