"""`python -m data_pipeline.build`: raw agent trajectories + chat logs → η-mixed, loss-masked TFRecord shards.

With no arguments it builds the bundled sample (configs/data/sample.yaml) into data/sample in a few
seconds. `--config configs/data/agenttuning.yaml` is the paper's recipe. Flags override the config file;
options this parser does not know are handed to Apache Beam (e.g. `--experiments`, `--sdk_container_image`).
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import sys
import time
from typing import Sequence

from data_pipeline.config import PipelineConfig, SourceConfig, expand_path, load_config
from data_pipeline.formats import records
from data_pipeline.formats.dataset import SAMPLE_DATASET_DIR, TOKENIZER_SUBDIR, load_manifest
from data_pipeline.manifest import TFDS_DATASET_INFO, TFDS_FEATURES
from data_pipeline.runner import (DEFAULT_DIRECT_MODE, DEFAULT_DIRECT_WORKERS, DEFAULT_RUNNER, local_runner,
                                  one_tokenizer_thread_per_worker)
from data_pipeline.staging import StagedTokenizer, remove_staging

log = logging.getLogger("data_pipeline.build")

OUTPUT_FILES = (records.MANIFEST_NAME, records.REJECTED_NAME, TFDS_DATASET_INFO, TFDS_FEATURES)
QUIET_BEAM_LOGGERS = ("apache_beam",)  # Beam's INFO lines (and its workers' relayed warnings) unless --verbose

__all__ = ["main", "parse_args", "run"]


def _floats(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(float(x) for x in text.split(",") if x.strip())


def _threshold(text: str) -> tuple[str, float]:
    task, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected TASK=VALUE, got {text!r}")
    return task, float(value)


def make_parser() -> argparse.ArgumentParser:
    d = PipelineConfig()
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.build", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Source syntax: [NAME=]PATH where PATH is a local or gs:// file, directory or glob (.jsonl, "
               ".json array, .parquet; .gz etc. decompressed), or [NAME=][hf:]OWNER/DATASET[:SPLIT,...] "
               "for a Hugging Face dataset (all splits unless listed). NAME defaults to the file name.")
    g = p.add_argument_group("pipeline (defaults: the embedded sample, configs/data/sample.yaml)")
    g.add_argument("--config", help="YAML file of pipeline options (configs/data/*.yaml); flags override it")
    g.add_argument("--agent", action="append", metavar="SRC",
                   help="agent trajectories (AgentInstruct format), repeatable; replaces the config's list")
    g.add_argument("--general", action="append", metavar="SRC",
                   help="general chat data (ShareGPT format), repeatable; replaces the config's list")
    g.add_argument("--general-weights", type=_floats, metavar="W,W,...",
                   help=f"sub-mix of the general sources, in order (default {','.join(map(str, d.general_weights))};"
                        " 'none' or empty = proportional to pool sizes)")
    g.add_argument("--tokenizer", metavar="PATH_OR_HF_ID",
                   help="tokenizer dir (tokenizer.model and/or tokenizer.json), gs:// dir or hub id "
                        "(default: the bundled tiny tokenizer)")
    g.add_argument("--eta", type=float, help=f"agent / (agent + general) examples (default {d.eta})")
    g.add_argument("--max-seq-len", type=int, help=f"longest conversation in tokens (default {d.max_seq_len})")
    g.add_argument("--validation-fraction", type=float,
                   help=f"fraction of each task held out (default {d.validation_fraction})")
    g.add_argument("--num-shards", type=int, help=f"train shards (default {d.num_shards})")
    g.add_argument("--num-validation-shards", type=int, help=f"validation shards (default {d.num_validation_shards})")
    g.add_argument("--seed", type=int, help=f"seed of every sampling decision (default {d.seed})")
    g.add_argument("--output", metavar="DIR_OR_GS", help=f"output directory, local or gs:// (default {SAMPLE_DATASET_DIR})")
    g.add_argument("--system-prompt", help=f"system prompt of records without one (default {d.system_prompt!r})")
    g.add_argument("--reward-threshold", type=_threshold, action="append", metavar="TASK=VALUE",
                   help="keep records whose reward >= VALUE for TASK ('default' for all other tasks); "
                        f"repeatable (default {d.reward_thresholds})")
    g.add_argument("--tokenize-batch-size", type=int, help="records per batch handed from the reader to the encoder, one fast-tokenizer call "
                        f"each (default {d.tokenize_batch_size})")
    b = p.add_argument_group("Apache Beam (any other Beam option is passed through as well)")
    b.add_argument("--runner", default=DEFAULT_RUNNER, help=f"Beam runner (default {DEFAULT_RUNNER}; "
                   "DataflowRunner for scale)")
    b.add_argument("--direct_num_workers", type=int, default=DEFAULT_DIRECT_WORKERS,
                   help=f"DirectRunner workers: threads, or processes in multi_processing (default {DEFAULT_DIRECT_WORKERS})")
    b.add_argument("--direct_running_mode", default=DEFAULT_DIRECT_MODE,
                   choices=["in_memory", "multi_threading", "multi_processing"],
                   help=f"DirectRunner mode (default {DEFAULT_DIRECT_MODE}: worker threads in this process, the "
                        "fastest on a few cores; multi_processing pays ~1.5 s to start Python workers but escapes "
                        "the GIL on many cores)")
    b.add_argument("--project", help="Dataflow: Google Cloud project")
    b.add_argument("--region", help="Dataflow: region, e.g. us-central1")
    b.add_argument("--temp_location", help="Dataflow: gs:// scratch path")
    p.add_argument("-v", "--verbose", action="store_true", help="show Beam's own log messages")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[PipelineConfig, list[str], argparse.Namespace]:
    """(config, Beam pipeline args, namespace)."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    cfg = load_config(args.config)
    changes = {}
    if args.agent is not None:
        changes["agent"] = tuple(_source(s) for s in args.agent)
    if args.general is not None:
        changes["general"] = tuple(_source(s) for s in args.general)
        if args.general_weights is None and len(changes["general"]) != len(cfg.general_weights):
            changes["general_weights"] = ()  # the config's weights were for other sources
    for flag in ("general_weights", "eta", "max_seq_len", "validation_fraction", "num_shards",
                 "num_validation_shards", "seed", "system_prompt", "tokenize_batch_size"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    for flag in ("tokenizer", "output"):
        if getattr(args, flag) is not None:
            changes[flag] = expand_path(getattr(args, flag))
    if args.reward_threshold:
        changes["reward_thresholds"] = {**cfg.reward_thresholds, **dict(args.reward_threshold)}
    try:
        cfg = cfg.replace(**changes)
    except ValueError as e:
        parser.error(str(e))
    beam_args = [f"--runner={args.runner}"]
    if args.runner == DEFAULT_RUNNER:
        beam_args += [f"--direct_num_workers={args.direct_num_workers}",
                      f"--direct_running_mode={args.direct_running_mode}"]
    for flag in ("project", "region", "temp_location"):
        if getattr(args, flag):
            beam_args.append(f"--{flag}={getattr(args, flag)}")
    return cfg, beam_args + extra, args


def _source(spec: str) -> SourceConfig:
    src = SourceConfig.parse(spec)
    return SourceConfig(expand_path(src.path), src.name, src.format, src.splits)


# --------------------------------------------------------------------------- running
def prepare_output(output: str) -> None:
    """Creates the output dir and removes what an earlier build left there (shards, manifest, rejects,
    tokenizer), so stale shards of another shard count can never be mixed in."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    try:
        existing = fs.ls(root, detail=False)
    except FileNotFoundError:  # object stores have no empty directories
        existing = []
    stale = [p for p in existing if records.parse_shard_filename(p) or posixpath.basename(p) in OUTPUT_FILES]
    if stale:
        log.info("removing %d files of an earlier build in %s", len(stale), output)
        fs.rm(stale)
    if fs.exists(posixpath.join(root, TOKENIZER_SUBDIR)):
        fs.rm(posixpath.join(root, TOKENIZER_SUBDIR), recursive=True)
    remove_staging(output)


def load_pipeline_tokenizer(cfg: PipelineConfig):
    """(the fast tokenizer, the manifest's tokenizer entry, {file name: bytes} of its defining files)."""
    import os

    from data_pipeline.formats.tokenizer import TOKENIZER_FILES, load_tokenizer, resolve_tokenizer_dir, tokenizer_info

    tokenizer = load_tokenizer(cfg.tokenizer)
    local_dir = resolve_tokenizer_dir(cfg.tokenizer)
    files = {}
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(local_dir, name)):
            with open(os.path.join(local_dir, name), "rb") as f:
                files[name] = f.read()
    target = posixpath.join(cfg.output, TOKENIZER_SUBDIR)
    info = tokenizer_info(cfg.tokenizer, tokenizer)
    info["path"] = target if "://" in target else os.path.abspath(target)
    return tokenizer, info, files


def write_tokenizer_copy(output: str, files: dict[str, bytes]) -> None:
    """OUTPUT/tokenizer: the dataset is self-contained (trainer and export load the tokenizer from there)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(posixpath.join(output, TOKENIZER_SUBDIR))
    fs.makedirs(root, exist_ok=True)
    for name, data in files.items():
        with fs.open(posixpath.join(root, name), "wb") as f:
            f.write(data)


def run(cfg: PipelineConfig, beam_args: Sequence[str] = (), verbose: bool = False) -> dict:
    """Runs the pipeline for `cfg`; returns the manifest it wrote."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from data_pipeline.beam_pipeline import build_graph
    from data_pipeline.formats.chat_template import serialize_tokenizer

    if not verbose:
        for name in QUIET_BEAM_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = [f"--runner={DEFAULT_RUNNER}", f"--direct_num_workers={DEFAULT_DIRECT_WORKERS}",
                     f"--direct_running_mode={DEFAULT_DIRECT_MODE}", *beam_args]
    start = time.perf_counter()
    tasks = read_tasks(cfg)
    log.info("%d read tasks from %d agent and %d general sources", len(tasks), len(cfg.agent), len(cfg.general))
    tokenizer, tokenizer_info, tokenizer_files = load_pipeline_tokenizer(cfg)  # before the output dir is cleared
    prepare_output(cfg.output)
    write_tokenizer_copy(cfg.output, tokenizer_files)
    log.info("running the Beam pipeline (%s) → %s", " ".join(beam_args), cfg.output)
    options = PipelineOptions(list(beam_args))
    runner = local_runner(options)
    try:
        staged = StagedTokenizer.write(serialize_tokenizer(tokenizer), cfg.output)
        with one_tokenizer_thread_per_worker(options if runner else None):
            with beam.Pipeline(runner=runner, options=options) as p:
                build_graph(p, cfg, tasks, tokenizer=staged, tokenizer_info=tokenizer_info)
    finally:
        remove_staging(cfg.output)
    manifest = load_manifest(cfg.output)
    log.info("done in %.1f s: %s", time.perf_counter() - start, summary(manifest))
    if not manifest["totals"]["kept"]:
        log.warning("no conversation was kept: see the reasons in %s and %s/%s", records.MANIFEST_NAME,
                    cfg.output, records.REJECTED_NAME)
    return manifest


class SourceError(RuntimeError):
    """A source cannot be read (an unset environment variable, a missing file, an unreachable hub...)."""


def read_tasks(cfg: PipelineConfig) -> list:
    """The read tasks of every source. Every source is resolved before any problem is raised, so that all
    of them are reported at once: one SourceError naming each problem (the first is its __cause__)."""
    from data_pipeline.sources import expand_source

    tasks, problems = [], []
    for kind, sources in (("agent", cfg.agent), ("general", cfg.general)):
        for source in sources:
            try:
                tasks += expand_source(source, kind)
            except (OSError, ValueError, RuntimeError) as e:
                problems.append(e)
    if len(problems) == 1:
        raise SourceError(str(problems[0])) from problems[0]
    if problems:
        listed = "".join(f"\n  - {type(e).__name__}: {e}" for e in problems)
        raise SourceError(f"{len(problems)} sources cannot be read:{listed}") from problems[0]
    return tasks


def summary(manifest: dict) -> str:
    t, mix = manifest["totals"], manifest["mix"]
    splits = ", ".join(f"{s} {v['examples']} examples / {v['tokens']} tokens ({v['loss_tokens']} loss) "
                       f"in {v['shards']} shards" for s, v in manifest["splits"].items())
    return (f"read {t['read']}, kept {t['kept']}, filtered {t['filtered']}, rejected {t['rejected']}; "
            f"eta {mix['eta']} achieved {mix['eta_achieved']:.4f}; {splits}")


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, beam_args, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return run(cfg, beam_args, verbose=args.verbose)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
