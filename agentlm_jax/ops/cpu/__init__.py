"""Kernels written for XLA:CPU and justified by CPU timings (bench/RESULTS.md). `agentlm_jax.ops` calls them only
when it traces for the CPU (`ops.backend`); no other backend ever traces this code."""
