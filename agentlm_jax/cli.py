"""What the command-line entry points share: logging, the mesh flags, and one error style.

Every entry point (`python -m agentlm_jax.train|export|generate`) reports a user error (errors.USER_ERRORS)
as one `error: ...` line with exit status 1, and bad command-line syntax with argparse's usage line and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Callable, TypeVar

import jax
from jax.sharding import Mesh

from agentlm_jax.config import DISTRIBUTED_MODES, MeshConfig
from agentlm_jax.errors import USER_ERRORS, ConfigError
from agentlm_jax.sharding import make_mesh

T = TypeVar("T")
QUIET_LOGGERS = ("absl", "jax._src.xla_bridge")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_reporting_errors(fn: Callable[[], T]) -> T:
    """fn(), with a user error turned into `error: ...` and exit status 1."""
    try:
        return fn()
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")


def checked_text(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse `type`: the text itself, once `check(text)` accepts it; its ValueError or ConfigError
    becomes the usage error (exit status 2, the usage line)."""
    def parse(text: str) -> str:
        try:
            check(text)
        except (ValueError, ConfigError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse


def add_mesh_args(p: argparse.ArgumentParser, *, fsdp: int) -> None:
    p.add_argument("--fsdp", type=int, default=fsdp, help="devices to shard the parameters over "
                   "(-1 = all the others; default %(default)s)")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices (default %(default)s)")
    p.add_argument("--distributed", default="auto", choices=DISTRIBUTED_MODES,
                   help="join the other hosts (jax.distributed.initialize) as the trainer does; auto (default): on "
                   "TPU VMs and SLURM/MPI/coordinator environments; off: never (e.g. JAX_PLATFORMS=cpu on one worker)")


def cli_mesh(args: argparse.Namespace) -> Mesh | None:
    """The mesh the CLI's --fsdp/--tensor describe (on the first devices if they use fewer); None = 1 device."""
    known = math.prod(n for n in (args.fsdp, args.tensor) if n != -1)
    if known > jax.device_count():
        raise ConfigError(f"--fsdp {args.fsdp} × --tensor {args.tensor} needs {known} devices, but there are "
                          f"{jax.device_count()}: use fewer (--fsdp -1 takes all of them)")
    devices = jax.devices() if -1 in (args.fsdp, args.tensor) else jax.devices()[:known]
    if len(devices) == 1:
        return None
    return make_mesh(MeshConfig(data=1, fsdp=args.fsdp, tensor=args.tensor), devices=devices)


def require_all_devices(mesh: Mesh | None) -> None:
    """On several hosts every host must hold part of each parameter (the gathers are collectives): refuse a
    --fsdp/--tensor mesh that leaves devices out."""
    if jax.process_count() > 1 and (mesh is None or mesh.devices.size != jax.device_count()):
        used = 1 if mesh is None else mesh.devices.size
        raise ConfigError(f"{jax.process_count()} hosts with {jax.device_count()} devices, but --fsdp/--tensor use "
                         f"{used}: on several hosts shard over all devices (--fsdp -1, or --fsdp × --tensor = "
                         f"{jax.device_count()}), or run on a single host")
