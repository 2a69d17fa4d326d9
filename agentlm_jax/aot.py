"""Ahead-of-time compilation of the real train step for a TPU slice, on any host (no TPU needed).

    devices = tpu_devices("v5e:4x4")                      # abstract devices of a 16-chip v5e slice (libtpu)
    report = compile_train_step(cfg, devices)             # the trainer's own TrainStep, lowered and compiled
    report.memory.argument_bytes, report.hlo, report.compile_s

libtpu (`pip install "jax[tpu]"`, the `tpu` extra) compiles for a named topology without the chips being there
(`jax.experimental.topologies`). The state and the batch are abstract (`jax.ShapeDtypeStruct` with their
shardings), so nothing is allocated: a 70B step compiles on a laptop. Nothing here initialises a TPU backend;
JAX keeps running on the host's own devices.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from agentlm_jax.config import TrainConfig
from agentlm_jax.data.packing import BATCH_KEYS
from agentlm_jax.sharding import batch_sharding, make_mesh
from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
from agentlm_jax.training.state import abstract_params, abstract_train_state, train_state_shardings
from agentlm_jax.training.step import TrainStep, check_batch_layout

# HBM per chip (GiB) of the TPU generations the configs name; v4 and v5p chips hold two TensorCores that JAX
# drives as one device ("megacore").
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
MEGACORE = ("v4", "v5p")


def tpu_devices(topology: str) -> list[Any]:
    """Abstract (compile-only) devices of a TPU topology such as `v5e:2x2`, `v4:2x2x1`, `v5p:2x2x1`."""
    from jax.experimental import topologies

    generation = topology.split(":", 1)[0]
    if generation not in HBM_GIB or ":" not in topology:
        raise ValueError(f"unknown TPU topology {topology!r}: give GENERATION:SHAPE with GENERATION one of "
                         f"{sorted(HBM_GIB)}, e.g. v5e:2x2 or v4:2x2x1")
    chip = "megacore" if generation in MEGACORE else "default"
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", chip_config_name=chip).devices)


@dataclasses.dataclass
class StepReport:
    memory: Any  # compiled.memory_analysis(): per-chip argument, output, temporary and generated-code bytes
    hlo: str  # the optimised HLO of the whole step
    compile_s: float
    loss_impl: str
    mesh_shape: dict[str, int]


def abstract_batch(cfg: TrainConfig, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    shape, sharding = (cfg.data.global_batch, cfg.data.max_seq_len), batch_sharding(mesh, rules)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}


def compile_train_step(cfg: TrainConfig, devices: Sequence[Any], num_tasks: int = 0) -> StepReport:
    """Lower and compile the train step the trainer would run for `cfg` on `devices` (abstract or real)."""
    mesh = make_mesh(cfg.mesh, list(devices))
    rules = cfg.mesh.rules
    check_batch_layout(cfg.data.global_batch, cfg.data.micro_batches, mesh, rules)
    optimizer = make_optimizer(cfg.optimizer, cfg.steps, abstract_params(cfg.model))
    shardings = train_state_shardings(cfg.model, optimizer, mesh, rules)
    step = TrainStep(cfg.model, optimizer, learning_rate_schedule(cfg.optimizer, cfg.steps), mesh=mesh, rules=rules,
                     state_shardings=shardings, data=cfg.data, loss=cfg.loss, num_tasks=num_tasks)
    state = abstract_train_state(shardings, cfg.model, optimizer)
    start = time.perf_counter()
    compiled = step.lower(state, abstract_batch(cfg, mesh, rules)).compile()
    return StepReport(memory=compiled.memory_analysis(), hlo=compiled.as_text(), compile_s=time.perf_counter() - start,
                      loss_impl=step.loss_impl, mesh_shape=dict(mesh.shape))
