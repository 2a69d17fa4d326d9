"""Export a trained model as a Hugging Face Llama checkpoint (local or gs://).

    python -m agentlm_jax.export --checkpoint runs/tiny/checkpoints --output runs/tiny/hf \\
        --tokenizer data/sample/tokenizer [--step N] [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]
    python -m agentlm_jax.export --checkpoint runs/lora/checkpoints --output runs/lora/adapter --peft

A LoRA run's checkpoint exports as the merged model (base + alpha/r · A·B, in --dtype), its base loaded from
the reference the run recorded; with --peft, as a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors) for `peft.PeftModel.from_pretrained(base, dir)` or vLLM's `--lora-modules`.

The source is a training run's orbax checkpoint directory (latest step unless --step) or a Hugging Face
directory (re-export: change dtype or shard size). The result loads with
`transformers.AutoModelForCausalLM.from_pretrained` and serves with vLLM / text-generation-inference.
A non-empty --output is refused unless --overwrite, which first removes the files of an earlier export there
(*.safetensors, the index, config.json, generation_config.json, tokenizer files) and keeps everything else.

Exit status: 0 when written; 1 with one `error: ...` line when a source, the output or the tokenizer does not
allow the export; 2 (with the usage line) for bad command-line syntax or an invalid option value.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from agentlm_jax import cli, distributed
from agentlm_jax.config import EXPORT_DTYPES, ExportConfig
from agentlm_jax.errors import ConfigError
from agentlm_jax.hf import export_hf
from agentlm_jax.hf.save import same_location, check_output, parse_size
from agentlm_jax.model_source import check_source, check_tokenizer, default_tokenizer, load_params, step_arg

log = logging.getLogger("agentlm_jax.export")


shard_size_arg = cli.checked_text(parse_size)  # --max-shard-size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agentlm_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training run's orbax checkpoint directory ({run_dir}/checkpoints or "
                     "the run directory; local or gs://)")
    src.add_argument("--hf", help="a Hugging Face Llama directory to re-export (local or gs://)")
    p.add_argument("--step", type=step_arg, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--output", required=True, help="output directory (local or gs://); must be new or empty "
                   "unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="export into a non-empty --output: remove the files "
                   "of an earlier export there first, keep the rest")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to save with the model (default: the "
                   "--hf directory's own tokenizer; for checkpoints, the tokenizer the training run recorded)")
    p.add_argument("--dtype", default=ExportConfig.dtype, choices=EXPORT_DTYPES,
                   help="dtype of the written weights (default %(default)s)")
    p.add_argument("--max-shard-size", type=shard_size_arg, default=ExportConfig.max_shard_size,
                   help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (GB = 10^9; a larger single tensor gets "
                   "its own file; default %(default)s)")
    p.add_argument("--peft", action="store_true", help="a LoRA run's checkpoint: write its adapters as a PEFT "
                   "adapter directory instead of the merged model")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights of an --hf source "
                   "(trusted files only)")
    cli.add_mesh_args(p, fsdp=-1)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """What is cheap to check from the file listings, before the hosts join up (nothing here touches JAX)."""
    source, flag = (args.checkpoint, "--checkpoint") if args.checkpoint else (args.hf, "--hf")
    kind = check_source(source, step=args.step, flag=flag)
    if args.hf and kind != "hf":
        raise ConfigError(f"--hf {args.hf} is a training run's checkpoint directory; use --checkpoint")
    if same_location(source, args.output):
        raise ConfigError(f"--output {args.output} is the source {flag}; export to another directory")
    check_output(args.output, overwrite=args.overwrite, flag="--output")
    if args.tokenizer:
        check_tokenizer(args.tokenizer)
    if args.peft and not args.checkpoint:
        raise ConfigError("--peft exports the adapters of a LoRA run's --checkpoint; --hf holds no adapters")


def export(args: argparse.Namespace) -> dict:
    check_args(args)
    distributed.initialize(args.distributed)
    mesh = cli.cli_mesh(args)
    cli.require_all_devices(mesh)
    if args.peft:
        from agentlm_jax.lora import export_checkpoint_adapter

        config = export_checkpoint_adapter(args.checkpoint, args.output, step=args.step, overwrite=args.overwrite)
        log.info("wrote the PEFT adapter (rank %d, alpha %g, %s) to %s", config["r"], config["lora_alpha"],
                 ",".join(config["target_modules"]), args.output)
        return config
    source = args.checkpoint or args.hf
    tokenizer = args.tokenizer or default_tokenizer(source, step=args.step)  # reads the run's info with orbax
    if tokenizer is not None and not args.tokenizer:
        check_tokenizer(tokenizer, what=f"the tokenizer recorded with {source},")
    cfg, params = load_params(source, step=args.step, mesh=mesh, allow_pickle=args.allow_pickle,
                              show_progress=distributed.is_main_process())
    index = export_hf(params, cfg, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      tokenizer_path=tokenizer, overwrite=args.overwrite,
                      show_progress=distributed.is_main_process())
    if distributed.is_main_process():  # the one that wrote
        log.info("wrote %d tensors (%.2f GB, %s) in %d files to %s", len(index["weight_map"]),
                 index["metadata"]["total_size"] / 1e9, args.dtype, len(set(index["weight_map"].values())),
                 args.output)
    return index


def main(argv: Sequence[str] | None = None) -> dict:
    """On a pod slice, run it on every worker (tpu/run.sh --foreground ...), as the trainer: the hosts join up
    (agentlm_jax.distributed), shard the parameters over all devices, gather each tensor together, and only
    process 0 writes files."""
    cli.configure_logging()
    args = parse_args(argv)
    return cli.run_reporting_errors(lambda: export(args))


if __name__ == "__main__":
    main()
