"""The one seam between the model and the backends: projections, attention and the loss.

    y = ops.project("BTD,DNH->BTNH", x, kernel)
    out = ops.attention(q, k, v, segment_ids, impl=cfg.attention_impl)
    nll = ops.token_nll(hidden, head_kernel, targets, impl="chunked", chunk_size=128, mask=loss_mask)

Each op takes the implementation `ops.backend` chooses for the platform being traced for: the CPU kernels of
`ops/cpu/` on CPU, plain `jnp.einsum` and JAX's own attention elsewhere (XLA's on TPU; on GPU
`dot_product_attention(implementation=None)`, so cuDNN can be chosen). The model files only name what they
compute.
"""

from agentlm_jax.ops.attention import attention, cached_attention
from agentlm_jax.ops.cross_entropy import resolve_impl as resolve_loss_impl
from agentlm_jax.ops.cross_entropy import token_nll
from agentlm_jax.ops.masking import attention_mask
from agentlm_jax.ops.backend import current_platform, platform
from agentlm_jax.ops.projection import PROJECTION, project

__all__ = ["PROJECTION", "attention", "attention_mask", "cached_attention", "current_platform", "platform",
           "project", "resolve_loss_impl", "token_nll"]
