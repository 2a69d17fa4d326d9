"""Export a trained model as a Hugging Face Llama checkpoint (local or gs://).

    python -m agentlm_jax.export --checkpoint runs/tiny/checkpoints --output runs/tiny/hf \\
        --tokenizer data/sample/tokenizer [--step N] [--dtype bfloat16] [--max-shard-size 5GB]

The source is a training run's orbax checkpoint directory (latest step unless --step) or a Hugging Face
directory (re-export: change dtype or shard size). The result loads with
`transformers.AutoModelForCausalLM.from_pretrained` and serves with vLLM / text-generation-inference.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from agentlm_jax import cli, distributed
from agentlm_jax.config import EXPORT_DTYPES, ExportConfig
from agentlm_jax.hf import export_hf
from agentlm_jax.model_source import default_tokenizer, load_params

log = logging.getLogger("agentlm_jax.export")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agentlm_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training run's orbax checkpoint directory (local or gs://)")
    src.add_argument("--hf", help="a Hugging Face Llama directory to re-export")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to save with the model (default: the "
                   "--hf directory's own tokenizer; for checkpoints, the dataset manifest's tokenizer path)")
    p.add_argument("--dtype", default=ExportConfig.dtype, choices=EXPORT_DTYPES, help="default %(default)s")
    p.add_argument("--max-shard-size", default=ExportConfig.max_shard_size,
                   help="e.g. 5GB, 500MB (default %(default)s)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (trusted files only)")
    cli.add_mesh_args(p, fsdp=-1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """On a pod slice, run it on every worker (tpu/run.sh --foreground ...), as the trainer: the hosts join up
    (agentlm_jax.distributed), shard the parameters over all devices, gather each tensor together, and only
    process 0 writes files."""
    cli.configure_logging()
    args = parse_args(argv)
    distributed.initialize(args.distributed)
    mesh = cli.cli_mesh(args)
    cli.require_all_devices(mesh)
    source = args.checkpoint or args.hf
    cfg, params = load_params(source, step=args.step, mesh=mesh, allow_pickle=args.allow_pickle)
    tokenizer = args.tokenizer or default_tokenizer(source, step=args.step)
    index = export_hf(params, cfg, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      tokenizer_path=tokenizer)
    if distributed.is_main_process():  # the one that wrote
        log.info("wrote %d tensors (%.2f GB, %s) in %d files to %s", len(index["weight_map"]),
                 index["metadata"]["total_size"] / 1e9, args.dtype, len(set(index["weight_map"].values())),
                 args.output)
    return index


if __name__ == "__main__":
    main()
