"""Multi-host setup and preemption: `jax.distributed.initialize()` on pods, SIGTERM → save and stop.

On a TPU pod slice every host runs the same command (tpu/ scripts); JAX finds the other hosts through the
TPU metadata server, so `jax.distributed.initialize()` needs no arguments there. Other clusters (SLURM,
Open MPI, an explicit coordinator) are recognised by their environment variables.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

# Environment variables that mean "this process is one of several" (or a TPU VM, where JAX asks the
# metadata server; initialising on a single-host TPU VM is harmless).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES")
_COUNT_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _on_tpu_vm() -> bool:
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0") or "TPU_ACCELERATOR_TYPE" in os.environ


def should_initialize(mode: str = "auto") -> bool:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if any(os.environ.get(k) for k in _CLUSTER_ENV):
        return True
    if any(int(os.environ.get(k, "1") or 1) > 1 for k in _COUNT_ENV):
        return True
    return _on_tpu_vm()


def initialize(mode: str = "auto") -> None:
    """Join the other hosts of the job (must run before anything touches the JAX backend)."""
    if not should_initialize(mode) or jax.distributed.is_initialized():
        return
    jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    """Only process 0 logs and writes metrics (every process takes part in checkpointing)."""
    return jax.process_index() == 0


class PreemptionWatch:
    """Turns SIGTERM (how TPU VMs announce preemption, and what `kill` sends) into a request to stop.

    The training loop asks `stop_requested(step)` after every step; when it says yes, the loop finishes the
    step, saves a checkpoint and exits. On several hosts, every host must stop at the same step (a save is
    a collective), so the decision is JAX's preemption sync point: its coordination service catches the
    notice (SIGTERM included) on any host and picks one step for all; no Python handler is installed then.
    """

    def __init__(self):
        self.signalled = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if not self.signalled:
            log.warning("SIGTERM received: finishing the current step, then saving a checkpoint and exiting")
        self.signalled = True

    def stop_requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on this host: its own copy when it has every shard (or a full replica), else
    gathered from all hosts (a collective: every host must call it)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree: Any) -> Any:
    """`to_host` over a tree of arrays."""
    return jax.tree.map(to_host, tree)


def host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Device metrics (replicated scalars) as Python floats."""
    return {k: float(v) for k, v in tree_to_host(dict(metrics)).items()}
