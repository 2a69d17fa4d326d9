"""All benchmarks, one after the other, each in its own process (`make bench`): the tables in the README.

    python -m bench.run_all            # the full set (about an hour on 2 cores)
    python -m bench.run_all --smoke    # toy sizes: checks every benchmark runs (a few minutes)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = {  # module: (full arguments, smoke arguments)
    "bench.matmul_peak": ([], []),
    "bench.bench_pipeline": ([], ["--sizes", "1000"]),
    "bench.bench_input": ([], ["--size", "smoke"]),
    "bench.bench_model": ([], ["--size", "smoke"]),
    "bench.bench_train": ([], ["--smoke"]),
    "bench.bench_templates": ([], ["--sizes", "200", "--repeat", "1"]),
    "bench.bench_lora": ([], ["--smoke"]),
    "bench.bench_eval": (["--in-loop"], ["--smoke"]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: check that every benchmark runs")
    parser.add_argument("--only", default="", help=f"comma-separated module names, of {', '.join(BENCHMARKS)} "
                        "(default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = [m for m in BENCHMARKS if not args.only or m in args.only.split(",")]
    failed = []
    for module in chosen:
        full, smoke = BENCHMARKS[module]
        command = [sys.executable, "-m", module, *(smoke if args.smoke else full)]
        print(f"\n## {' '.join(command[1:])}\n", flush=True)
        start = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            failed.append(module)
        print(f"\n({module}: {time.perf_counter() - start:.0f} s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
