"""Llama 2 in Flax NNX, in floors: layers (primitives) → attention / mlp → block → llama (the model)."""
