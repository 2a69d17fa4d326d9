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
import math
import posixpath
from typing import Any, Sequence

import fsspec
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from agentlm_jax import distributed
from agentlm_jax.hf_io import CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, EXPORT_DTYPES, export_hf, import_hf
from agentlm_jax.model.config import ModelConfig
from agentlm_jax.sharding import DEFAULT_RULES, MeshConfig, Rules, make_mesh

log = logging.getLogger("agentlm_jax.export")


def is_hf_dir(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(posixpath.join(root, CONFIG_NAME))


def load_params(source: str, *, step: int | None = None, runtime: dict[str, Any] | None = None,
                mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                allow_pickle: bool = False) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params) from a Hugging Face directory or a training run's orbax checkpoint directory;
    `runtime` overrides how the model runs (e.g. {"dtype": "bfloat16"}), never its architecture."""
    if is_hf_dir(source):
        if step is not None:
            raise ValueError(f"--step applies to orbax checkpoints; {source} is a Hugging Face directory")
        return import_hf(source, runtime=runtime, mesh=mesh, rules=rules, allow_pickle=allow_pickle)
    try:
        from agentlm_jax.checkpointing import load_model_params
    except ImportError as e:
        raise RuntimeError(f"{source} has no {CONFIG_NAME}, so it would be an orbax checkpoint directory, but "
                           f"agentlm_jax.checkpointing is unavailable ({e})") from e
    shardings = None
    if mesh is not None:
        from agentlm_jax.sharding import state_shardings

        shardings = lambda abstract_params: state_shardings(abstract_params, mesh, rules)  # noqa: E731
    cfg, params = load_model_params(source, step=step, shardings=shardings)
    cfg = cfg.replace(**(runtime or {}))
    stored = {x.dtype for x in jax.tree.leaves(params)}
    if stored != {jnp.dtype(cfg.param_dtype)}:  # e.g. float32 master weights, served in bfloat16
        params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    return cfg, params


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
    p.add_argument("--dtype", default="bfloat16", choices=sorted(EXPORT_DTYPES))
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB (default %(default)s)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (trusted files only)")
    add_mesh_args(p, fsdp=-1)
    return p.parse_args(argv)


def add_mesh_args(p: argparse.ArgumentParser, *, fsdp: int) -> None:
    p.add_argument("--fsdp", type=int, default=fsdp, help="devices to shard the parameters over "
                   "(-1 = all the others; default %(default)s)")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices (default %(default)s)")
    p.add_argument("--distributed", default="auto", choices=["auto", "on", "off"],
                   help="join the other hosts (jax.distributed.initialize) as the trainer does; auto (default): on "
                   "TPU VMs and SLURM/MPI/coordinator environments; off: never (e.g. JAX_PLATFORMS=cpu on one worker)")


def cli_mesh(args: argparse.Namespace) -> Mesh | None:
    """The mesh the CLI's --fsdp/--tensor describe (on the first devices if they use fewer); None = 1 device."""
    known = math.prod(n for n in (args.fsdp, args.tensor) if n != -1)
    devices = jax.devices() if -1 in (args.fsdp, args.tensor) else jax.devices()[:known]
    if len(devices) == 1:
        return None
    return make_mesh(MeshConfig(data=1, fsdp=args.fsdp, tensor=args.tensor), devices=devices)


def main(argv: Sequence[str] | None = None) -> dict:
    """On a pod slice, run it on every worker (tpu/run.sh --foreground ...), as the trainer: the hosts join up
    (agentlm_jax.distributed), shard the parameters over all devices, gather each tensor together, and only
    process 0 writes files."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    distributed.initialize(args.distributed)
    mesh = cli_mesh(args)
    require_all_devices(mesh)
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


def require_all_devices(mesh: Mesh | None) -> None:
    """On several hosts every host must hold part of each parameter (the gathers are collectives): refuse a
    --fsdp/--tensor mesh that leaves devices out."""
    if jax.process_count() > 1 and (mesh is None or mesh.devices.size != jax.device_count()):
        used = 1 if mesh is None else mesh.devices.size
        raise SystemExit(f"{jax.process_count()} hosts with {jax.device_count()} devices, but --fsdp/--tensor use "
                         f"{used}: on several hosts shard over all devices (--fsdp -1, or --fsdp × --tensor = "
                         f"{jax.device_count()}), or run on a single host")


def default_tokenizer(source: str, *, step: int | None = None) -> str | None:
    """The tokenizer that goes with a model source: a Hugging Face directory's own tokenizer files, or the
    tokenizer the training run recorded in its checkpoint; None if neither is known."""
    if is_hf_dir(source):
        fs, root = fsspec.core.url_to_fs(source)
        has_files = any(fs.exists(posixpath.join(root, n)) for n in ("tokenizer.json", "tokenizer.model"))
        return source if has_files else None
    from agentlm_jax.checkpointing import tokenizer_path

    return tokenizer_path(source, step)


if __name__ == "__main__":
    main()
