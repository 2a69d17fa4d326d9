"""Plan a run on a TPU slice without one: `python -m agentlm_jax.plan --config C --topology SLICE [key=value ...]`.

    python -m agentlm_jax.plan --config configs/llama2-7b.yaml --topology v5e-16
    python -m agentlm_jax.plan --config configs/llama2-70b.yaml --topology v5p-128 --search
    python -m agentlm_jax.plan --config configs/llama2-7b.yaml --topology v5e-16 --slices 2 mesh.data=2

Compiles the trainer's own train step for the slice ahead of time (libtpu: `pip install "jax[tpu]"`; no TPU
needed) and prints, per chip: parameters, optimizer state, the other arguments (the batch), temporaries
(gradients, activations, gathered parameters), the program, and the total against the chip's HBM (v4 32 GiB,
v5e 16, v5p 95, v6e 32), with the headroom left; the compile time; model FLOPs per step and per chip (the
trainer's formula, training/metrics.py); the bytes each kind of collective produces (each HLO instruction once,
so one inside the scan over layers is counted once, not per layer).

--search tries mesh splits (tensor 1, 2, 4, 8 where it divides the KV heads and the chips; fsdp the rest),
micro-batches (1, 2, 4, 8 where the rows split over the batch axes) and remat policies (none, save_dots, full),
cheapest first: fewest micro-batches, then least recomputation (none < save_dots < full), then the least
tensor parallelism; it stops at the first that fits with the headroom and prints the overrides to use.
--slices N plans for N such slices joined by the data-center network (multislice): the mesh's data axis must
be a multiple of N (it spans the slices; fsdp and tensor stay inside each), and --search sets it to N.
Exit status: 0 when the plan (or a search result) fits, 3 when it does not, 1 with an `error: ...` line for a
config, topology or mesh that cannot be planned, 2 for bad command-line syntax.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Iterator, Sequence

from agentlm_jax import cli
from agentlm_jax.config import TrainConfig, load_config
from agentlm_jax.errors import ConfigError

GIB = 2**30
REMAT_COST = {"none": 0, "save_dots": 1, "full": 2}
EXIT_DOES_NOT_FIT = 3


@dataclasses.dataclass(frozen=True)
class Candidate:
    tensor: int
    micro_batches: int
    remat: str
    slices: int = 1

    def overrides(self, chips: int) -> list[str]:
        return [f"mesh.data={self.slices}", f"mesh.fsdp={chips // (self.tensor * self.slices)}",
                f"mesh.tensor={self.tensor}",
                f"data.micro_batches={self.micro_batches}", f"model.remat={self.remat}"]


def candidates(cfg: TrainConfig, chips: int, *, tensors: Sequence[int] = (1, 2, 4, 8),
               micro_batches: Sequence[int] = (1, 2, 4, 8),
               remats: Sequence[str] = ("none", "save_dots", "full"), slices: int = 1) -> list[Candidate]:
    """The search space in the order tried (see the module doc); `chips` counts all slices."""
    out = []
    for mb in sorted(micro_batches):
        for remat in sorted(remats, key=REMAT_COST.__getitem__):
            for tp in sorted(tensors):
                fsdp = chips // (tp * slices) if chips % (tp * slices) == 0 else 0
                rows = cfg.data.global_batch // mb if cfg.data.global_batch % mb == 0 else 0
                if fsdp and rows and rows % (fsdp * slices) == 0 and cfg.model.num_kv_heads % tp == 0:
                    out.append(Candidate(tp, mb, remat, slices))
    return out


def plan(cfg: TrainConfig, topology: str, *, hbm_gib: float | None = None, headroom: float = 0.1, slices: int = 1):
    """(report, per-chip HBM bytes, fits) of the train step for `cfg` on the slice."""
    from agentlm_jax.aot import HBM_GIB, compile_train_step, topology_name, tpu_devices

    try:
        name = topology_name(topology)
        devices = tpu_devices(name, slices)
        report = compile_train_step(cfg, devices)
    except ValueError as e:  # ConfigError included
        raise ConfigError(f"{topology}: {e}") from None
    hbm = (hbm_gib or HBM_GIB[name.split(":")[0]]) * GIB
    return report, hbm, report.total_bytes <= (1 - headroom) * hbm


def describe(cfg: TrainConfig, topology: str, report, hbm: float, fits: bool) -> Iterator[str]:
    from agentlm_jax.aot import collective_bytes
    from agentlm_jax.training.metrics import flops_per_token

    m = report.memory
    chips = math.prod(report.mesh_shape.values())
    other_args = m.argument_size_in_bytes - report.params_bytes - report.optimizer_bytes - report.base_bytes
    total = report.total_bytes
    yield (f"{topology}: {chips} chips, {hbm / GIB:.0f} GiB HBM each; mesh "
           + " ".join(f"{k}={v}" for k, v in report.mesh_shape.items())
           + f"; loss {report.loss_impl}; remat {cfg.model.remat}; {cfg.data.micro_batches} micro-batch(es) of "
             f"{cfg.micro_batch} x {cfg.data.max_seq_len}")
    if cfg.lora.enabled:
        yield (f"  LoRA rank {cfg.lora.rank} on {','.join(cfg.lora.targets)}: frozen base ({cfg.lora.base_dtype}) "
               f"{report.base_bytes / GIB:.2f} GiB per chip; the parameters and optimizer state below are the "
               f"adapters'")
    yield (f"  per chip: parameters {report.params_bytes / GIB:.2f} GiB, optimizer state "
           f"{report.optimizer_bytes / GIB:.2f} GiB, batch and other arguments {other_args / GIB:.2f} GiB, "
           f"temporaries (gradients, activations, gathered parameters) {m.temp_size_in_bytes / GIB:.2f} GiB, "
           f"program {m.generated_code_size_in_bytes / GIB:.2f} GiB")
    verdict = "fits" if fits else "DOES NOT FIT"
    yield f"  total {total / GIB:.2f} GiB of {hbm / GIB:.0f} GiB: {verdict} ({1 - total / hbm:.0%} free)"
    step_flops = flops_per_token(cfg.model, cfg.data.max_seq_len) * cfg.data.global_batch * cfg.data.max_seq_len
    yield (f"  model FLOPs per step {step_flops:.3g} ({step_flops / chips:.3g} per chip); compile "
           f"{report.compile_s:.1f} s")
    volume = collective_bytes(report.hlo)
    yield "  collectives (bytes per chip, each HLO instruction once): " + (
        ", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in sorted(volume.items())) or "none")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agentlm_jax.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: the built-in tiny CPU demo)")
    p.add_argument("--topology", required=True, help="a TPU slice (v5e-16, v4-32, v5p-128, v6e-64) or topology "
                   "(v5e:4x4, v4:2x2x4)")
    p.add_argument("--slices", type=int, default=1, help="that many slices joined by DCN (multislice; default "
                   "%(default)s)")
    p.add_argument("--search", action="store_true", help="find the cheapest mesh / micro-batches / remat that fits")
    p.add_argument("--headroom", type=float, default=0.1, help="HBM share to keep free (default %(default)s)")
    p.add_argument("--hbm-gib", type=float, default=None, help="HBM per chip in GiB (default: the generation's)")
    p.add_argument("--tensor-options", default="1,2,4,8", help="--search: tensor sizes (default %(default)s)")
    p.add_argument("--micro-batch-options", default="1,2,4,8", help="--search: micro-batches (default %(default)s)")
    p.add_argument("--remat-options", default="none,save_dots,full", help="--search: remat (default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    cli.configure_logging()
    args = parse_args(argv)
    return cli.run_reporting_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    label = args.topology if args.slices == 1 else f"{args.slices} x {args.topology}"
    if not args.search:
        report, hbm, fits = plan(cfg, args.topology, hbm_gib=args.hbm_gib, headroom=args.headroom, slices=args.slices)
        print("\n".join(describe(cfg, label, report, hbm, fits)), flush=True)
        if not fits:
            sys.exit(EXIT_DOES_NOT_FIT)
        return 0
    from agentlm_jax.aot import tpu_devices

    try:
        chips = len(tpu_devices(args.topology, args.slices))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tried = candidates(cfg, chips, tensors=_ints(args.tensor_options), micro_batches=_ints(args.micro_batch_options),
                       remats=[r for r in args.remat_options.split(",") if r], slices=args.slices)
    if not tried:
        raise ConfigError(f"{args.topology}: no candidate splits data.global_batch={cfg.data.global_batch} over "
                          f"{chips} chips with these options")
    for candidate in tried:
        trial = load_config(args.config, [*args.overrides, *candidate.overrides(chips)])
        report, hbm, fits = plan(trial, args.topology, hbm_gib=args.hbm_gib, headroom=args.headroom,
                                 slices=args.slices)
        print("\n".join(describe(trial, label, report, hbm, fits)), flush=True)
        if fits:
            print("recommended overrides: " + " ".join(candidate.overrides(chips)), flush=True)
            return 0
    print(f"nothing tried fits {args.topology} with {args.headroom:.0%} headroom", flush=True)
    sys.exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    main()
