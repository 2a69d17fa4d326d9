"""Causal, packed, grouped-query attention by the splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`).

The kernel takes one example's q [N,T,H] and k, v [K,S,H] (K divides N: grouped-query heads share their key
and value head inside the kernel, nothing is repeated in HBM), a causal mask whose fully masked blocks it
never computes, and segment ids, so packed conversations never see each other. It does not scale the scores:
q is scaled by 1/sqrt(H) first. Over the mesh it runs under `shard_map`: the batch split like the logical
`batch` axis and the heads like `act_heads` (the rules table decides, as everywhere), each device calling the
kernel on its own examples and heads (ops/kernel_sharding.py).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agentlm_jax.config import Rules
from agentlm_jax.ops.kernel_sharding import head_axes, run_sharded
from agentlm_jax.sharding import axes_size


def supports(seq_len: int, block_size: int) -> bool:
    """Whether the kernel can take sequences of `seq_len` (whole blocks of at least 128 positions)."""
    block = min(block_size, seq_len)
    return block >= 128 and block % 128 == 0 and seq_len % block == 0


@functools.lru_cache(maxsize=32)
def _kernel(seq_len: int, num_heads: int, block_size: int, head_shards: int, interpret: bool):
    block = min(block_size, seq_len)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
    with jax.ensure_compile_time_eval():  # concrete mask tables, never tracers of the trace that asked first
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=head_shards, q_seq_shards=1,
                                      interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, block_size: int,
                     mesh: Mesh | None, rules: Rules | None, interpret: bool) -> jax.Array:
    """Attention output [B,T,N,H] of q [B,T,N,H] over k, v [B,T,K,H], causal within the segments of
    segment_ids [B,T]. `interpret`: run the kernel in Pallas' interpreter (any device; tests)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = (q * H ** -0.5).astype(q.dtype).transpose(0, 2, 1, 3)  # [B,N,T,H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,H]

    def per_example(kernel, q, k, v, seg):
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, seg)

    if mesh is None or rules is None:
        out = per_example(_kernel(T, N, block_size, 1, interpret), q, k, v, segment_ids)
    else:
        heads = head_axes(mesh, rules, N, K)
        kernel = _kernel(T, N, block_size, axes_size(mesh, heads), interpret)
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(heads or None, None)))
        out = run_sharded(per_example, q, k, v, segment_ids, mesh=mesh, rules=rules, heads=heads, head_axis=1,
                          leading=(kernel,), leading_specs=(kernel_spec,))
    return out.transpose(0, 2, 1, 3)
