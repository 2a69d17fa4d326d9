"""Kernels for GPUs: `agentlm_jax.ops` calls them when it traces for a GPU. On any other device they run in
Pallas' interpret mode, which is how the tests check them on a CPU."""
