"""agentlm-jax: AgentTuning (agent trajectories + general chat) fine-tuning of Llama 2 in JAX/Flax NNX."""

__version__ = "0.1.0"
