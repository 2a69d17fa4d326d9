"""Training: the state and its shardings (state.py), the jitted step (step.py), the loss reductions (loss.py),
AdamW and its schedule (optimizer.py), orbax checkpoints (checkpointing.py), metrics and MFU (metrics.py), and
the loop that ties them together (trainer.py; its CLI is `python -m agentlm_jax.train`)."""
