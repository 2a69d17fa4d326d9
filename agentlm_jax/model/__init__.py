"""Llama 2 in Flax NNX, in floors: layers (primitives) → attention / mlp → block → llama (the model); kv_cache.
How projections and attention are computed on each backend is `agentlm_jax.ops`'s business."""
