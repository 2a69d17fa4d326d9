"""`python -m data_pipeline.build`: raw agent trajectories + chat logs → η-mixed, loss-masked TFRecord shards.

With no arguments it builds the bundled sample (configs/data/sample.yaml) into data/sample in a few
seconds. `--config configs/data/agenttuning.yaml` is the paper's recipe. Flags override the config file.
Apache Beam's own options (e.g. `--experiments`, `--sdk_container_image`, `--num_workers`) are passed to
Beam; anything after `--` is passed to Beam unchecked; any other option is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import posixpath
import sys
import time
from typing import Sequence

from data_pipeline.config import RECORD_FORMATS, PipelineConfig, SourceConfig, expand_path, load_config
from data_pipeline.errors import BuildError, ConfigError, SourceError, TemplateError, TokenizerError
from data_pipeline.formats import records
from data_pipeline.formats.chat_template import DEFAULT_SYSTEM_PROMPT
from data_pipeline.formats.dataset import SAMPLE_DATASET_DIR, TOKENIZER_SUBDIR, load_manifest
from data_pipeline.runner import (DEFAULT_DIRECT_MODE, DEFAULT_DIRECT_WORKERS, DEFAULT_RUNNER, local_runner,
                                  one_tokenizer_thread_per_worker)
from data_pipeline.staging import (StagedTokenizer, check_output, discard, leftover_staging_dirs, publish,
                                   staging_dir)

log = logging.getLogger("data_pipeline.build")

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
        prog="python -m data_pipeline.build", description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Source syntax: [NAME=]PATH where PATH is a local or gs:// file, directory or glob (.jsonl, "
               ".json array, .parquet; .gz etc. decompressed), or [NAME=][hf:]OWNER/DATASET[:SPLIT,...] "
               "for a Hugging Face dataset (all splits unless listed). NAME defaults to the file name.")
    g = p.add_argument_group("pipeline (defaults: the embedded sample, configs/data/sample.yaml; "
                             "--max_seq_len etc. work too)")
    g.add_argument("--config", help="YAML file of pipeline options (configs/data/*.yaml); flags override it")
    g.add_argument("--agent", action="append", metavar="SRC",
                   help="agent trajectories (AgentInstruct format), repeatable; replaces the config's list")
    g.add_argument("--general", action="append", metavar="SRC",
                   help="general chat data (ShareGPT format), repeatable; replaces the config's list")
    for kind in ("agent", "general"):
        g.add_argument(f"--{kind}-format", choices=RECORD_FORMATS, metavar="auto|sharegpt|openai",
                       help=f"the record layout of every {kind} source (default: each source's record_format, auto = "
                            "detected per record): sharegpt (conversations of from/value turns, AgentInstruct's and "
                            "LLaMA-Factory's tool turns too) or openai (messages with tool_calls); a record of "
                            "another layout is rejected (wrong_record_format)")
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
    g.add_argument("--output", metavar="DIR_OR_GS", help=f"output directory, local or gs:// (default {SAMPLE_DATASET_DIR}); "
                   "must be empty unless --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output, once the new build has succeeded (a failed build leaves it as it was)")
    g.add_argument("--system-prompt", help=f"system prompt of records without one (default: {DEFAULT_SYSTEM_PROMPT!r} "
                   "with the llama2 template; none with a Jinja template, which then writes its own default, as a "
                   "server does; \"\" for none)")
    g.add_argument("--reward-threshold", type=_threshold, action="append", metavar="TASK=VALUE",
                   help="keep records whose reward >= VALUE for TASK ('default' for all other tasks); "
                        f"repeatable (default {d.reward_thresholds})")
    g.add_argument("--chat-template", metavar="llama2|hf|JINJA_FILE",
                   help=f"the chat template (default {d.chat_template}): llama2 (the paper's), hf (the tokenizer's "
                        "own chat_template, from chat_template.jinja or tokenizer_config.json) or a Jinja file; "
                        "the ids and loss mask of a Jinja template are checked against transformers' "
                        "apply_chat_template on every record (docs/data_pipeline.md, 'Chat templates')")
    g.add_argument("--max-template-reject-fraction", type=float, metavar="F",
                   help="fail the build when more than this fraction of the records read are rejected by the "
                        f"chat template's check (default {d.max_template_reject_fraction})")
    g.add_argument("--tokenize-batch-size", type=int, help="records per batch handed from the reader to the encoder, one fast-tokenizer call "
                        f"each (default {d.tokenize_batch_size})")
    b = p.add_argument_group("Apache Beam (any other option Beam defines is passed to it too, and anything after --)")
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
    """(config, Beam pipeline args, namespace). Bad syntax, unknown options and bad values exit with argparse's
    usage line (status 2); a config file that cannot be read or has an unknown key raises ConfigError."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:  # everything after a bare "--" goes to Beam as it is
        argv, passthrough = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args, extra = parser.parse_known_args(_dashed_flags(parser, argv))
    beam_extra = _beam_options(parser, extra)
    try:
        cfg = load_config(args.config)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    changes = {}
    try:
        if args.agent is not None:
            changes["agent"] = tuple(_source(s) for s in args.agent)
        if args.general is not None:
            changes["general"] = tuple(_source(s) for s in args.general)
            if args.general_weights is None and len(changes["general"]) != len(cfg.general_weights):
                changes["general_weights"] = ()  # the config's weights were for other sources
    except ValueError as e:
        parser.error(str(e))
    for kind in ("agent", "general"):
        if (record_format := getattr(args, f"{kind}_format")) is not None:
            changes[kind] = tuple(dataclasses.replace(s, record_format=record_format)
                                  for s in changes.get(kind, getattr(cfg, kind)))
    for flag in ("general_weights", "eta", "max_seq_len", "validation_fraction", "num_shards",
                 "num_validation_shards", "seed", "system_prompt", "tokenize_batch_size",
                 "max_template_reject_fraction"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    for flag in ("tokenizer", "output"):
        if getattr(args, flag) is not None:
            changes[flag] = expand_path(getattr(args, flag))
    if args.chat_template is not None:
        choice = args.chat_template
        changes["chat_template"] = choice if choice in ("llama2", "hf") else expand_path(choice)
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
    return cfg, beam_args + beam_extra + passthrough, args


def _long_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [o for o in parser._option_string_actions if o.startswith("--")]


def _dashed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--max_seq_len` → `--max-seq-len`: the pipeline's flags also in the underscore spelling Beam's use."""
    ours = set(_long_flags(parser))
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name.startswith("--") and name not in ours and name.replace("_", "-") in ours:
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def _beam_parser() -> argparse.ArgumentParser:
    """A parser of every option Beam's PipelineOptions classes define (as PipelineOptions builds it)."""
    from apache_beam.options import pipeline_options as po

    parser = po._BeamArgumentParser(allow_abbrev=False)
    classes = {}
    for cls in po.PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)
    return parser


def _beam_options(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    """The arguments our parser did not know, when Beam defines them all; otherwise a usage error that
    suggests the closest known option."""
    if not extra:
        return []
    beam = _beam_parser()
    _, unknown = beam.parse_known_args(extra)
    if not unknown:
        return list(extra)
    bad = unknown[0]
    if not bad.startswith("-"):
        parser.error(f"unexpected argument {bad!r}")
    name = bad.partition("=")[0]
    known = _long_flags(parser) + _long_flags(beam)
    close = difflib.get_close_matches(name, known, n=1) or difflib.get_close_matches(name.replace("_", "-"), known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    parser.error(f"unknown option {name}{hint} (options for Beam that it does not define go after --)")


def _source(spec: str) -> SourceConfig:
    src = SourceConfig.parse(spec)
    return SourceConfig(expand_path(src.path), src.name, src.format, src.splits)


# --------------------------------------------------------------------------- running
def load_pipeline_tokenizer(cfg: PipelineConfig):
    """(the fast tokenizer, the manifest's tokenizer entry, {file name: bytes} of its defining files).
    The entry's `path` is relative to the dataset (its own copy), so the dataset can be moved."""
    from data_pipeline.formats.tokenizer import TOKENIZER_FILES, load_tokenizer, resolve_tokenizer_dir, tokenizer_info

    try:
        tokenizer = load_tokenizer(cfg.tokenizer, require_bos_eos=cfg.chat_template == "llama2")
        local_dir = resolve_tokenizer_dir(cfg.tokenizer)
        files = {}
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(local_dir, name)):
                with open(os.path.join(local_dir, name), "rb") as f:
                    files[name] = f.read()
        info = tokenizer_info(cfg.tokenizer, tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        raise TokenizerError(f"tokenizer {cfg.tokenizer}: {e}") from None
    info["path"] = TOKENIZER_SUBDIR
    return tokenizer, info, files


def load_chat_template(cfg: PipelineConfig):
    """The configured Jinja template (hf_template.TemplateSpec), None for llama2; a TokenizerError if there
    is none."""
    from data_pipeline.formats.hf_template import resolve_template
    from data_pipeline.formats.tokenizer import resolve_tokenizer_dir

    try:
        return resolve_template(cfg.chat_template, resolve_tokenizer_dir(cfg.tokenizer)
                                if cfg.chat_template == "hf" else "")
    except (OSError, ValueError, RuntimeError) as e:
        raise TokenizerError(f"chat template: {e}") from None


def check_template_rejections(manifest: dict, rejected_path: str, fraction: float) -> None:
    """A TemplateError when more than `fraction` of the records read were rejected by the template's contract
    check; it names the first such record and why."""
    import json

    import fsspec

    from data_pipeline.formats.hf_template import TEMPLATE_REASONS

    read = manifest["totals"]["read"]
    bad = sum(n for s in manifest["sources"].values() for r, n in s["rejected_by_reason"].items()
              if r in TEMPLATE_REASONS)
    if not bad or bad <= fraction * read:
        return
    first = None
    with fsspec.open(rejected_path, "r") as f:
        for line in f:
            row = json.loads(line)
            if row["reason"] in TEMPLATE_REASONS:
                first = row
                break
    where = f"{first['source']} {first['file']} record {first['number']}: {first['reason']}: {first.get('detail')}" \
        if first else "?"
    raise TemplateError(f"{bad} of {read} records do not encode as the chat template's contract requires "
                        f"(more than max_template_reject_fraction {fraction}); the first: {where}")


def write_tokenizer_copy(output: str, files: dict[str, bytes]) -> None:
    """OUTPUT/tokenizer: the dataset is self-contained (trainer and export load the tokenizer from there)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(posixpath.join(output, TOKENIZER_SUBDIR))
    fs.makedirs(root, exist_ok=True)
    for name, data in files.items():
        with fs.open(posixpath.join(root, name), "wb") as f:
            f.write(data)


def input_paths(cfg: PipelineConfig) -> list[str]:
    """The local or URL paths the sources read (a glob's directory part), for the overlap check."""
    paths = []
    for source in cfg.agent + cfg.general:
        path = source.path
        if source.format == "hf" or "${" in path:
            continue
        if any(c in path for c in "*?["):
            path = path[: min(path.find(c) for c in "*?[" if c in path)].rpartition("/")[0] or "."
        paths.append(path)
    return paths


def run(cfg: PipelineConfig, beam_args: Sequence[str] = (), verbose: bool = False, overwrite: bool = False) -> dict:
    """Runs the pipeline for `cfg`; returns the manifest it wrote. Everything is checked before the pipeline
    starts (output, sources, tokenizer: BuildError); the build is written to a staging directory beside the
    output and replaces the output only when it succeeded (staging.py)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from data_pipeline.beam_pipeline import build_graph
    from data_pipeline.formats.chat_template import ChatEncoder, serialize_tokenizer

    if not verbose:
        for name in QUIET_BEAM_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = [f"--runner={DEFAULT_RUNNER}", f"--direct_num_workers={DEFAULT_DIRECT_WORKERS}",
                     f"--direct_running_mode={DEFAULT_DIRECT_MODE}", *beam_args]
    start = time.perf_counter()
    check_output(cfg.output, input_paths(cfg), overwrite)
    tasks = read_tasks(cfg)
    log.info("%d read tasks from %d agent and %d general sources", len(tasks), len(cfg.agent), len(cfg.general))
    tokenizer, tokenizer_info, tokenizer_files = load_pipeline_tokenizer(cfg)
    template = load_chat_template(cfg)
    if template is not None:  # (the dataset's tokenizer copy holds the template it was built with)
        from data_pipeline.formats.hf_template import special_tokens_of

        tokenizer_files["chat_template.jinja"] = template.text.encode()
        special_tokens = special_tokens_of(tokenizer)
        log.info("chat template %s (%s, sha256 %s, mask from %s)", template.name, template.source,
                 template.sha256[:12], "{% generation %}" if template.mask == "generation" else "prefix renderings")
    serialized = serialize_tokenizer(tokenizer)
    if found := ChatEncoder.from_serialized(*serialized).special_token_text(cfg.effective_system_prompt):
        raise TokenizerError(f"--system-prompt contains {found!r}, the text of a special token of the tokenizer: "
                             "a Hugging Face client would read it as that token; remove it")
    if leftovers := leftover_staging_dirs(cfg.output):
        log.warning("staging directories of interrupted builds (safe to delete): %s", " ".join(leftovers))
    staging = staging_dir(cfg.output)
    log.info("running the Beam pipeline (%s) → %s (staged in %s)", " ".join(beam_args), cfg.output, staging)
    options = PipelineOptions(list(beam_args))
    runner = local_runner(options)
    try:
        write_tokenizer_copy(staging, tokenizer_files)
        staged = StagedTokenizer.write(serialized, staging)
        with one_tokenizer_thread_per_worker(options if runner else None):
            with beam.Pipeline(runner=runner, options=options) as p:
                build_graph(p, cfg, tasks, tokenizer=staged, tokenizer_info=tokenizer_info, output=staging,
                            spill=runner is not None, template=template,
                            special_tokens=special_tokens if template is not None else None)
        staged_manifest = load_manifest(staging)  # (the pipeline finished: its manifest must be there)
        if template is not None:
            check_template_rejections(staged_manifest, posixpath.join(staging, records.REJECTED_NAME),
                                      cfg.max_template_reject_fraction)
    except BaseException:
        discard(staging)
        raise
    publish(staging, cfg.output)
    manifest = load_manifest(cfg.output)
    log.info("done in %.1f s: %s", time.perf_counter() - start, summary(manifest))
    if not manifest["totals"]["kept"]:
        log.warning("no conversation was kept: see the reasons in %s and %s/%s", records.MANIFEST_NAME,
                    cfg.output, records.REJECTED_NAME)
    return manifest


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
    """The CLI: a BuildError (bad config, source, tokenizer or output) is one `error: ...` line, exit status 1."""
    try:
        cfg, beam_args, args = parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
        return run(cfg, beam_args, verbose=args.verbose, overwrite=args.overwrite)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
