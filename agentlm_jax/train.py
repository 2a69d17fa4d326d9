"""Train: `python -m agentlm_jax.train [--config configs/X.yaml] [key=value ...]`.

With no arguments: the tiny model on the bundled sample dataset (built under data/sample if missing) for the
default number of steps (`steps=N` for another), then a checkpoint and a Hugging Face export under runs/tiny. Overrides are
dotted config keys, e.g. `optimizer.learning_rate=2e-5 mesh.tensor=4 data.path=gs://bucket/agentlm-data`.
Rerunning the same command resumes from the run's latest checkpoint. Exit status: 0 when training finished,
143 when stopped by SIGTERM (preemption) after saving a checkpoint, 1 with an `error: ...` line when the
config, the mesh, the dataset or the run directory does not allow the run (or the training diverged),
2 for bad command-line syntax.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from agentlm_jax import cli
from agentlm_jax.config import TrainConfig, load_config
from agentlm_jax.training.trainer import EXIT_PREEMPTED, RunResult, train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agentlm_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Defaults: {TrainConfig().steps} steps, run_dir={TrainConfig().run_dir}, "
                                       f"data.path={TrainConfig().data.path} (all: agentlm_jax/config/schema.py)")
    p.add_argument("--config", default=None, help="YAML config (default: the built-in tiny CPU demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> RunResult:
    cli.configure_logging()
    args = parse_args(argv)
    result = cli.run_reporting_errors(lambda: train(load_config(args.config, args.overrides)))
    if result.status == "preempted":
        sys.exit(EXIT_PREEMPTED)
    return result


if __name__ == "__main__":
    main()
