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
import math
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from agentlm_jax.config import TrainConfig
from agentlm_jax.data.packing import BATCH_KEYS
from agentlm_jax.sharding import batch_sharding, make_mesh
from agentlm_jax.training.optimizer import learning_rate_schedule, make_optimizer
from agentlm_jax.training.state import abstract_base, abstract_params, abstract_train_state, base_shardings, \
    train_state_shardings
from agentlm_jax.training.step import TrainStep, check_batch_layout

# HBM per chip (GiB) of the TPU generations the configs name; v4 and v5p chips hold two TensorCores that JAX
# drives as one device ("megacore").
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
MEGACORE = ("v4", "v5p")


# Slice names (as gcloud spells them: v5e/v6e count chips, v4/v5p count TensorCores, two per chip) → topology.
_SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}


def topology_name(slice_or_topology: str) -> str:
    """`v5e-16` → `v5e:4x4`, `v5p-128` → `v5p:4x4x4` (64 chips), `v4:2x2x1` as it is."""
    if ":" in slice_or_topology:
        return slice_or_topology
    generation, _, count = slice_or_topology.partition("-")
    if generation not in HBM_GIB or not count.isdigit():
        raise ValueError(f"unknown TPU slice {slice_or_topology!r}: give e.g. v5e-16, v4-32, v5p-128, v6e-64, or a "
                         f"topology such as v5e:4x4")
    chips = int(count) // (2 if generation in MEGACORE else 1)
    shapes = _SHAPES_3D if generation in MEGACORE else _SHAPES_2D
    if chips not in shapes:
        raise ValueError(f"unknown TPU slice {slice_or_topology!r}: {generation} slices of "
                         f"{sorted(n * (2 if generation in MEGACORE else 1) for n in shapes)} are known")
    return f"{generation}:{shapes[chips]}"


def tpu_devices(topology: str, slices: int = 1) -> list[Any]:
    """Abstract (compile-only) devices of a TPU slice (`v5e-16`) or topology (`v5e:2x2`, `v4:2x2x1`); with
    slices > 1, of that many such slices joined by the data-center network (multislice)."""
    from jax.experimental import topologies

    topology = topology_name(topology)
    generation = topology.split(":", 1)[0]
    if generation not in HBM_GIB or ":" not in topology:
        raise ValueError(f"unknown TPU topology {topology!r}: give GENERATION:SHAPE with GENERATION one of "
                         f"{sorted(HBM_GIB)}, e.g. v5e:2x2 or v4:2x2x1")
    chip = "megacore" if generation in MEGACORE else "default"
    if slices < 1:
        raise ValueError(f"slices must be >= 1, got {slices}")
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", chip_config_name=chip,
                                             num_slices=slices).devices)


@dataclasses.dataclass
class StepReport:
    memory: Any  # compiled.memory_analysis(): per-chip argument, output, temporary and generated-code bytes
    hlo: str  # the optimised HLO of the whole step
    compile_s: float
    loss_impl: str
    mesh_shape: dict[str, int]
    params_bytes: int  # per chip: this chip's shard of the parameters
    optimizer_bytes: int  # per chip: its shard of the optimizer state (AdamW's moments) and counters
    base_bytes: int = 0  # LoRA: per chip, its shard of the frozen base weights (`params_bytes` = the adapters)

    @property
    def total_bytes(self) -> int:
        """What the step needs on a chip: its arguments (state + batch; the outputs reuse them, donated), the
        temporaries (gradients, activations, gathered parameters) and the program."""
        m = self.memory
        return m.argument_size_in_bytes + m.temp_size_in_bytes + m.generated_code_size_in_bytes


_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes produced per chip by each kind of collective in the HLO text, each instruction counted once (one
    inside a loop body, e.g. the scan over layers, is counted once, not once per iteration)."""
    out: dict[str, int] = {}
    for m in _COLLECTIVE.finditer(hlo):
        size = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(m[1]))
        out[m[2]] = out.get(m[2], 0) + size
    return out


def abstract_batch(cfg: TrainConfig, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    shape, sharding = (cfg.data.global_batch, cfg.data.max_seq_len), batch_sharding(mesh, rules)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}


def compile_train_step(cfg: TrainConfig, devices: Sequence[Any], num_tasks: int = 0) -> StepReport:
    """Lower and compile the train step the trainer would run for `cfg` on `devices` (abstract or real)."""
    mesh = make_mesh(cfg.mesh, list(devices))
    rules = cfg.mesh.rules
    check_batch_layout(cfg.data.global_batch, cfg.data.micro_batches, mesh, rules)
    lora = cfg.lora if cfg.lora.enabled else None
    optimizer = make_optimizer(cfg.optimizer, cfg.steps, abstract_params(cfg.model, lora))
    shardings = train_state_shardings(cfg.model, optimizer, mesh, rules, lora=lora)
    base_s = base_shardings(cfg.model, lora, mesh, rules) if lora else None
    step = TrainStep(cfg.model, optimizer, learning_rate_schedule(cfg.optimizer, cfg.steps), mesh=mesh, rules=rules,
                     state_shardings=shardings, data=cfg.data, loss=cfg.loss, num_tasks=num_tasks, lora=lora,
                     base_shardings=base_s)
    state = abstract_train_state(shardings, cfg.model, optimizer, lora)
    base = None
    if lora:  # the frozen base: an argument of the step, ShapeDtypeStructs on its shardings
        base = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract_base(cfg.model, lora).to_pure_dict(), base_s)
    start = time.perf_counter()
    compiled = step.lower(state, abstract_batch(cfg, mesh, rules), base=base).compile()
    return StepReport(memory=compiled.memory_analysis(), hlo=compiled.as_text(), compile_s=time.perf_counter() - start,
                      loss_impl=step.loss_impl, mesh_shape=dict(mesh.shape), params_bytes=shard_bytes(state.params),
                      optimizer_bytes=shard_bytes((state.opt_state, state.step)),
                      base_bytes=shard_bytes(base) if base is not None else 0)


def shard_bytes(tree: Any) -> int:
    """Bytes of one chip's shards of a tree of sharded ShapeDtypeStructs (the first device's; shards are equal)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
