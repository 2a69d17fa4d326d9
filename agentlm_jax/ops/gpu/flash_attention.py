"""Causal, packed attention by JAX's Pallas GPU flash kernel (`jax.experimental.pallas.ops.gpu.attention.mha`).

The kernel takes q, k, v [B,T,N,H] and segment ids [B,T] (tokens attend only within their own conversation),
computes the softmax tile by tile (no [B,N,T,T] scores) and has its own backward kernel. It has no grouped-query
form, so K/V heads are repeated to the query heads first. Over the mesh each device runs it on its own rows and
heads (ops/kernel_sharding.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
from jax.sharding import Mesh

from agentlm_jax.config import Rules
from agentlm_jax.ops.kernel_sharding import head_axes, run_sharded


def supports(seq_len: int, block_size: int) -> bool:
    """Whether the kernel can take sequences of `seq_len` (whole blocks of at least 16 positions)."""
    block = min(block_size, seq_len)
    return block >= 16 and seq_len % block == 0


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, block_size: int,
                    mesh: Mesh | None, rules: Rules | None, interpret: bool) -> jax.Array:
    """Attention output [B,T,N,H] of q [B,T,N,H] over k, v [B,T,K,H], causal within the segments of
    segment_ids [B,T]. `interpret`: run the kernel in Pallas' interpreter (any device; tests)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    if K != N:
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    block = min(block_size, T)
    sizes = pallas_gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                                  block_q_dq=block, block_kv_dq=block)

    def kernel(q, k, v, seg):
        return pallas_gpu.mha(q, k, v, seg, sm_scale=H ** -0.5, causal=True, block_sizes=sizes, interpret=interpret)

    if mesh is None or rules is None:
        return kernel(q, k, v, segment_ids)
    return run_sharded(kernel, q, k, v, segment_ids, mesh=mesh, rules=rules, heads=head_axes(mesh, rules, N, N),
                       head_axis=2)
