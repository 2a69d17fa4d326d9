"""Agent evaluation (issue #13): `python -m agentlm_jax.evaluate`; suites actions, dbbench, general
(docs/evaluation.md); `in_loop.evaluate_in_loop` for the trainer."""
