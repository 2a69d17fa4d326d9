"""This machine's measured float32 matmul peak, the denominator of every MFU we report.

The peak is the best FLOP/s of square float32 matmuls over a few sizes, measured with both XLA (JAX) and
PyTorch when it is installed, each on all cores; we take the larger, so MFU is never flattered.
Run: python -m bench.matmul_peak [--sizes 1024,2048,3072]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SIZES = (1024, 2048, 3072)


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up (compile, allocate)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def jax_matmul_flops(n: int, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / _best_time(lambda: f(a, a).block_until_ready(), repeats)


def torch_matmul_flops(n: int, repeats: int = 5) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(n, n, dtype=torch.float32)
    return 2 * n**3 / _best_time(lambda: a @ a, repeats)


def measure_matmul_peak(sizes=SIZES) -> dict:
    """{'peak_flops': float, 'by': {'jax': {n: flops}, 'torch': {n: flops}}}."""
    by: dict[str, dict[int, float]] = {"jax": {}, "torch": {}}
    for n in sizes:
        by["jax"][n] = jax_matmul_flops(n)
        t = torch_matmul_flops(n)
        if t is not None:
            by["torch"][n] = t
    peak = max(v for d in by.values() for v in d.values())
    return {"peak_flops": peak, "by": by}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.matmul_peak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="comma-separated square matrix sizes (default %(default)s)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    result = measure_matmul_peak(tuple(int(n) for n in args.sizes.split(",")))
    for lib, d in result["by"].items():
        for n, f in d.items():
            print(f"{lib:6s} {n:5d}x{n:<5d} {f / 1e9:8.1f} GFLOP/s")
    print(f"peak   {result['peak_flops'] / 1e9:8.1f} GFLOP/s (float32)")
    return result


if __name__ == "__main__":
    main()
