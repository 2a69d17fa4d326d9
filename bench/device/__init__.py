"""Benchmarks for a machine with an accelerator (one prepared script each; see bench/RESULTS.md)."""
