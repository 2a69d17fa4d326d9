"""Causal, segment-masked attention computed tile by tile, skipping the tiles in which nothing is attended.

The [T,S] score matrix is cut into query blocks × key blocks. A tile is computed only if at least one of its
(query, key) pairs is allowed (key not after the query, same segment; see `ops.masking.attention_mask`):
tiles above the diagonal are never computed (causal), and, data-dependently (`lax.cond`), neither are the
tiles between different packed conversations. Within a query block the softmax is accumulated over its key
tiles online (running maximum and sum, as in flash attention), so no [B,N,T,S] tensor exists. The backward pass
(`jax.custom_vjp`) keeps only the output and each row's log-sum-exp, and recomputes the probabilities of the
computed tiles (transposed, [S,T], so that three of its four matmuls need no transposed copy).

Plain JAX, written for XLA:CPU (the default there; `ops.backend`), where `jax.nn.dot_product_attention` computes
the whole [B,N,T,S] square with its masked softmax and keeps the probabilities for the backward pass. Equal to
it within float32 rounding.
Grouped-query heads: the G = N/K query heads of one key/value head are stacked as rows ([B,K,G·t,H]), so every
matmul is batched over (B, K) only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from agentlm_jax.ops.masking import attention_mask

# The score given to a masked pair: finite, so a row whose first tiles are all masked stays NaN-free (such
# entries are zeroed explicitly as well).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _blocks(length: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _allowed(seg_q, seg_k, q0, k0):
    """[B,t,s] bool: which pairs of a tile may attend (key slot not after the query slot, same segment)."""
    return attention_mask(seg_q, seg_k, q0 + jnp.arange(seg_q.shape[1]), k0 + jnp.arange(seg_k.shape[1]))[:, 0]


def _causal_tiles(blocks):
    """(i, j) of the tiles on or below the diagonal: key block j starts before query block i ends."""
    return [(i, j) for i, (_, q1) in enumerate(blocks) for j, (k0, _) in enumerate(blocks) if k0 < q1]


def _needed(segment_ids, blocks):
    """{(i, j): scalar bool}: the tile has at least one allowed pair in some row of the batch."""
    return {(i, j): jnp.any(_allowed(segment_ids[:, q0:q1], segment_ids[:, k0:k1], q0, k0))
            for i, j in _causal_tiles(blocks) for (q0, q1), (k0, k1) in [(blocks[i], blocks[j])]}


def _rows(x, G, q0, q1):
    """Query-side tile [B,K,G·t,...] of x [B,K,G,T,...]."""
    t = x[:, :, :, q0:q1]
    return t.reshape(t.shape[0], t.shape[1], G * (q1 - q0), *t.shape[4:])


def _row_mask(allowed, G):
    """[B,1,G·t,s] from a tile's [B,t,s] mask (the same for every head)."""
    return jnp.tile(allowed, (1, G, 1))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                        block_size: int = 128) -> jax.Array:
    """Attention output [B,T,N,H] of q [B,T,N,H] over k, v [B,T,K,H] (K divides N), causal and within the
    segments of segment_ids [B,T]; scores scaled by 1/sqrt(H), softmax in float32."""
    return _forward(q, k, v, segment_ids, block_size)[0]


def _split_heads(q, k, v):
    B, T, N, H = q.shape
    K = k.shape[2]
    qt = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
    return qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # k, v: [B,K,S,H]


def _forward(q, k, v, segment_ids, block_size):
    B, T, N, H = q.shape
    K = k.shape[2]
    G, scale = N // K, H ** -0.5
    qt, kt, vt = _split_heads(q, k, v)
    blocks = _blocks(T, block_size)
    needed = _needed(segment_ids, blocks)
    outs, lses = [], []
    for i, (q0, q1) in enumerate(blocks):
        q_i = _rows(qt, G, q0, q1)  # [B,K,G·t,H]
        m = jnp.full(q_i.shape[:-1], -jnp.inf, jnp.float32)  # running row maximum
        l = jnp.zeros(q_i.shape[:-1], jnp.float32)  # running sum of exp(score - m)
        o = jnp.zeros(q_i.shape, jnp.float32)  # running sum of exp(score - m) · v
        for j, (k0, k1) in enumerate(blocks[:i + 1]):
            def update(m, l, o, k_j, v_j, allowed):
                s = jnp.einsum("BKTH,BKSH->BKTS", q_i, k_j, preferred_element_type=jnp.float32) * scale
                s = jnp.where(allowed, s, _MASKED)
                m_new = jnp.maximum(m, s.max(axis=-1))
                p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                pv = jnp.einsum("BKTS,BKSH->BKTH", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, l * correction + p.sum(axis=-1), o * correction[..., None] + pv

            allowed = _row_mask(_allowed(segment_ids[:, q0:q1], segment_ids[:, k0:k1], q0, k0), G)
            m, l, o = jax.lax.cond(needed[i, j], update, lambda m, l, o, *_: (m, l, o),
                                   m, l, o, kt[:, :, k0:k1], vt[:, :, k0:k1], allowed)
        outs.append((o / l[..., None]).reshape(B, K, G, q1 - q0, H))
        lses.append((m + jnp.log(l)).reshape(B, K, G, q1 - q0))
    out = jnp.concatenate(outs, axis=3)  # [B,K,G,T,H]
    lse = jnp.concatenate(lses, axis=3)  # [B,K,G,T]
    out_bthn = out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)
    return out_bthn, (q, k, v, segment_ids, out, lse)


def _backward(block_size, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    B, T, N, H = q.shape
    K = k.shape[2]
    G, scale = N // K, H ** -0.5
    qt, kt, vt = _split_heads(q, k, v)
    d_out = d_out.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).astype(jnp.float32)  # [B,K,G,T,H]
    delta = jnp.sum(d_out * out, axis=-1)  # [B,K,G,T]: rowwise dO·O, the softmax backward's correction
    blocks = _blocks(T, block_size)
    needed = _needed(segment_ids, blocks)
    dq = [jnp.zeros((B, K, G * (q1 - q0), H), jnp.float32) for q0, q1 in blocks]
    dk = [jnp.zeros((B, K, k1 - k0, H), jnp.float32) for k0, k1 in blocks]
    dv = [jnp.zeros((B, K, k1 - k0, H), jnp.float32) for k0, k1 in blocks]

    def update(dq_i, dk_j, dv_j, q_i, do_i, lse_i, delta_i, k_j, v_j, allowed_t):
        # Everything transposed: [B,K,s,G·t], so dV and dK are plain (s × G·t) @ (G·t × H) products.
        s_t = jnp.einsum("BKSH,BKTH->BKST", k_j, q_i, preferred_element_type=jnp.float32) * scale
        p_t = jnp.where(allowed_t, jnp.exp(s_t - lse_i[:, :, None, :]), 0.0)
        dv_j = dv_j + jnp.einsum("BKST,BKTH->BKSH", p_t, do_i, preferred_element_type=jnp.float32)
        dp_t = jnp.einsum("BKSH,BKTH->BKST", v_j, do_i, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_i[:, :, None, :]) * scale
        dk_j = dk_j + jnp.einsum("BKST,BKTH->BKSH", ds_t, q_i, preferred_element_type=jnp.float32)
        dq_i = dq_i + jnp.einsum("BKST,BKSH->BKTH", ds_t, k_j, preferred_element_type=jnp.float32)
        return dq_i, dk_j, dv_j

    for i, j in _causal_tiles(blocks):
        (q0, q1), (k0, k1) = blocks[i], blocks[j]
        allowed_t = _row_mask(_allowed(segment_ids[:, q0:q1], segment_ids[:, k0:k1], q0, k0), G).swapaxes(2, 3)
        operands = (_rows(qt, G, q0, q1), _rows(d_out, G, q0, q1), _rows(lse, G, q0, q1),
                    _rows(delta, G, q0, q1), kt[:, :, k0:k1], vt[:, :, k0:k1], allowed_t)
        dq[i], dk[j], dv[j] = jax.lax.cond(needed[i, j], update, lambda dq_i, dk_j, dv_j, *_: (dq_i, dk_j, dv_j),
                                           dq[i], dk[j], dv[j], *operands)
    dq = jnp.concatenate([d.reshape(B, K, G, -1, H) for d in dq], axis=3)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)
    dk = jnp.concatenate(dk, axis=2).transpose(0, 2, 1, 3).astype(k.dtype)
    dv = jnp.concatenate(dv, axis=2).transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv, None


blockwise_attention.defvjp(_forward, _backward)
