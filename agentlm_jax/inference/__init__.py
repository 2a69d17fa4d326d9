"""Inference: batched KV-cache generation (generate.py) and next-token sampling (sampling.py)."""
