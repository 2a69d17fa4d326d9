"""The Llama family (Llama 2 and 3.x, Qwen 2.5) in Flax NNX, in floors: layers (primitives) → attention / mlp →
block → llama (the model); kv_cache.
How projections and attention are computed on each backend is `agentlm_jax.ops`'s business."""
