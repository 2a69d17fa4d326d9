"""Evaluate a model: `python -m agentlm_jax.evaluate --model RUN_DIR|CHECKPOINT|HF_DIR --suite NAMES [options]`.

    python -m agentlm_jax.evaluate --model runs/tiny/hf --suite actions,dbbench,general
    python -m agentlm_jax.evaluate --model runs/agentlm-7b --suite dbbench --db-items AgentBench/data/dbbench/standard.jsonl
    python -m agentlm_jax.evaluate --model runs/agentlm-7b --suite dbbench --db mysql://root@127.0.0.1:3306
    python -m agentlm_jax.evaluate --model gs://B/agentlm-7b-hf --suite actions --data gs://B/agenttuning-data --max-items 100

Suites (docs/evaluation.md):
  actions   teacher-forced next-action accuracy per AgentInstruct task on a pipeline output's split (--data;
            default: the bundled sample built by data_pipeline into a temporary directory)
  dbbench   interactive AgentBench-style DB episodes on SQLite, or a MySQL/MariaDB server with --db mysql://...
            (--db-items; default: a small invented sample)
  general   MMLU-format multiple choice by answer-letter likelihood, GSM8K-format final-number exact match
            (--mmlu, --gsm8k; default: tiny invented samples)

Decoding is greedy through the stack's batched KV-cache generation. Results: OUTPUT/eval.json and
OUTPUT/eval.md (the paper's AgentLM-7B numbers beside ours where it reports the same task, labelled).

Exit status: 0 when evaluated; 1 with one `error: ...` line for a missing or unusable model, tokenizer or
input file (named with its line and reason); 2 (with the usage line) for bad command-line syntax.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

from agentlm_jax import cli, distributed
from agentlm_jax.errors import ConfigError, MissingInputError
from agentlm_jax.generate import non_negative_int, positive_int, tokenizer_of
from agentlm_jax.model_source import check_source, check_tokenizer, load_model, step_arg

log = logging.getLogger("agentlm_jax.evaluate")
SUITES = ("actions", "dbbench", "general")


def suite_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(SUITES)
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown suite {', '.join(unknown) if unknown else repr(text)}: choose from "
                                         f"{', '.join(SUITES)} (comma-separated) or all")
    return list(dict.fromkeys(names))


def db_arg(text: str) -> str:
    """--db: sqlite or mysql://USER[:PASSWORD]@HOST[:PORT], checked here (a bad one is a usage error)."""
    from agentlm_jax.evaluation.dbbench import parse_db

    return cli.checked_text(parse_db)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agentlm_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face directory, a training run directory or its "
                   "checkpoints directory (local or gs://)")
    p.add_argument("--step", type=step_arg, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    p.add_argument("--suite", type=suite_list, default=list(SUITES), help="comma-separated: actions, dbbench, "
                   "general, or all (default: all)")
    p.add_argument("--data", default=None, help="actions: a data_pipeline output directory (default: the bundled "
                   "sample, built into a temporary directory)")
    p.add_argument("--split", default="validation", choices=["validation", "train"],
                   help="actions: the split to read (default %(default)s)")
    p.add_argument("--max-items", type=positive_int, default=50, help="actions: records per task; dbbench, "
                   "general: items per benchmark (default %(default)s)")
    p.add_argument("--db-items", default=None, help="dbbench: an AgentBench dbbench JSONL file (dev.jsonl, "
                   "standard.jsonl; default: the package's invented sample)")
    p.add_argument("--db", type=db_arg, default="sqlite", help="dbbench: where episodes run: sqlite (default, in "
                   "memory) or mysql://USER[:PASSWORD]@HOST[:PORT], a MySQL/MariaDB server (driver: pip install "
                   "'agentlm-jax[mysql]'; MYSQL_PWD when the URL has no password; one database per episode)")
    p.add_argument("--max-rounds", type=positive_int, default=5, help="dbbench: SQL statements per episode at "
                   "most (default %(default)s, AgentBench's)")
    p.add_argument("--mmlu", default=None, help="general: an MMLU-format JSONL file (default: the package sample)")
    p.add_argument("--gsm8k", default=None, help="general: a GSM8K-format JSONL file (default: the package sample)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="tokens per model turn at most (default %(default)s, the paper's evaluation)")
    p.add_argument("--gsm8k-max-new-tokens", type=positive_int, default=256, help="(default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together (default "
                   "%(default)s)")
    p.add_argument("--chat-template", default="auto", choices=["auto", "llama2", "hf"],
                   help="dbbench/general prompts: auto (default): the template --data's manifest records (the "
                   "one the data was built with), else the tokenizer's own (an export carries the training one), "
                   "else llama2, the pipeline's default")
    p.add_argument("--system-prompt", default=None, help="dbbench/general: the system prompt (default: the "
                   "one --data was built with, else the training default; \"\" for none, as the paper's "
                   "evaluation harness)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--output", default=None, help="directory for eval.json and eval.md (default: "
                   "eval/<model name>)")
    p.add_argument("--seed", type=non_negative_int, default=0, help=argparse.SUPPRESS)
    cli.add_mesh_args(p, fsdp=1)
    return p


def default_output(model: str) -> str:
    return os.path.join("eval", posixpath.basename(model.rstrip("/")) or "model")


def sample_data_dir(tokenizer_dir: str) -> str:
    """The bundled sample built with data_pipeline (its defaults, `tokenizer_dir`) into a temporary directory."""
    out = os.path.join(tempfile.mkdtemp(prefix="agentlm-eval-"), "data")
    log.info("building the bundled sample with data_pipeline into %s", out)
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--output", out, "--tokenizer", tokenizer_dir],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"building the sample data failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out


def _data_template(data_dir: str) -> dict | None:
    """The chat template the dataset's manifest records (None when it has no manifest)."""
    import fsspec

    from agentlm_jax.evaluation.lm import data_template_of

    path = posixpath.join(data_dir, "manifest.json")
    try:
        with fsspec.open(path, "rt") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg})") from None
    return data_template_of(manifest, path)


def check_records(records, vocab_size: int, where: str) -> None:
    for r in records:
        if len(r.input_ids) and int(r.input_ids.max()) >= vocab_size:
            raise ConfigError(f"{where}record {r.id!r}: token id {int(r.input_ids.max())} >= the model's vocabulary "
                              f"({vocab_size}): the data was tokenized with another tokenizer")


def run(args: argparse.Namespace) -> dict:
    check_source(args.model, step=args.step, flag="--model")
    if args.tokenizer:
        check_tokenizer(args.tokenizer)
    for flag, path in (("--db-items", args.db_items), ("--mmlu", args.mmlu), ("--gsm8k", args.gsm8k)):
        if path and "://" not in path and not os.path.isfile(path):
            raise MissingInputError(f"{flag} {path}: does not exist")
    from agentlm_jax.evaluation import actions, dbbench, general, report
    from agentlm_jax.evaluation.lm import LM
    from agentlm_jax.evaluation.suites import SuiteInputs, run_suites

    # Inputs first (cheap, and a bad file is reported before the model loads).
    db_items = db_source = mmlu = gsm8k = db_backend = None
    if "dbbench" in args.suite:
        db_items, db_source = dbbench.load_items(args.db_items, limit=args.max_items)
        db_backend = dbbench.open_backend(args.db)  # a missing driver or an unreachable server: said here
    if "general" in args.suite:
        mmlu = general.load_mmlu(args.mmlu, limit=args.max_items)
        gsm8k = general.load_gsm8k(args.gsm8k, limit=args.max_items)

    distributed.initialize(args.distributed)
    mesh = cli.cli_mesh(args)
    cli.require_all_devices(mesh)
    tokenizer_dir = tokenizer_of(args)
    from data_pipeline.formats.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    records = where = data_dir = data_template = None
    if "actions" in args.suite:
        if args.data:
            data_dir = args.data
            records, where = actions.read_split(data_dir, args.split)
            data_template = _data_template(data_dir)
        else:
            data_dir = sample_data_dir(tokenizer_dir)
            try:
                records, where = actions.read_split(data_dir, args.split)
                data_template = _data_template(data_dir)
            finally:
                shutil.rmtree(os.path.dirname(data_dir), ignore_errors=True)
            data_dir = where = "the bundled sample (data_pipeline defaults)"
            where += ": "
    main = distributed.is_main_process()
    cfg, model = load_model(args.model, step=args.step, dtype=args.dtype, mesh=mesh, show_progress=main)
    if records is not None:
        check_records(records, cfg.vocab_size, where)
    lm = LM(model, tokenizer, batch_size=args.batch_size, chat_template=args.chat_template,
            system_prompt=args.system_prompt, data_template=data_template)
    meta = {"model": args.model, "step": args.step, "tokenizer": tokenizer_dir, "chat_template": lm.chat_template,
            "max_new_tokens": args.max_new_tokens, "model_config": {k: getattr(cfg, k) for k in (
                "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings")},
            "data": data_dir, "split": args.split, "max_items": args.max_items}
    inputs = SuiteInputs(records=records, where=where or "", db_items=db_items, db_source=db_source,
                         db_backend=db_backend, mmlu=mmlu, gsm8k=gsm8k)
    if db_backend is not None:
        meta.update(dbbench_source=db_source, dbbench_items=len(db_items), dbbench_backend=db_backend.describe())
    try:
        suites, timing = run_suites(lm, args.suite, inputs, max_items=args.max_items,
                                    max_new_tokens=args.max_new_tokens, max_rounds=args.max_rounds,
                                    gsm8k_max_new_tokens=args.gsm8k_max_new_tokens, show_progress=main)
    finally:
        if db_backend is not None:
            db_backend.close()
    meta["timing"] = timing
    results = {"meta": meta, "suites": suites}
    if main:
        json_path, md_path = report.write(results, args.output or default_output(args.model))
        print(report.markdown(results))
        log.info("wrote %s and %s", json_path, md_path)
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    cli.configure_logging()
    args = build_parser().parse_args(argv)
    return cli.run_reporting_errors(lambda: run(args))


if __name__ == "__main__":
    main()
