"""The blockwise attention (ops/cpu/blockwise_attention.py) against `jax.nn.dot_product_attention` with the
packed-sequence mask: same outputs and gradients (MHA and grouped-query heads, ragged last blocks, padding),
packed conversations isolated bit for bit, and the fully masked tiles really skipped. (Its agreement with
`transformers` through the whole model is in test_model.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentlm_jax.ops.cpu.blockwise_attention import blockwise_attention
from agentlm_jax.ops.masking import attention_mask


def reference(q, k, v, segment_ids):
    slots = jnp.arange(q.shape[1])
    mask = attention_mask(segment_ids, segment_ids, slots, slots)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def packed_segments(lengths_per_row, width):
    """[B,width] segment ids: the given conversation lengths one after another, then padding (0)."""
    out = np.zeros((len(lengths_per_row), width), np.int32)
    for r, lengths in enumerate(lengths_per_row):
        start = 0
        for s, n in enumerate(lengths, 1):
            out[r, start:start + n] = s
            start += n
    return jnp.asarray(out)


def qkv(B, T, N, K, H=16, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (B, T, N, H), dtype), jax.random.normal(ks[1], (B, T, K, H), dtype),
            jax.random.normal(ks[2], (B, T, K, H), dtype), jax.random.normal(ks[3], (B, T, N, H), jnp.float32))


@pytest.mark.parametrize("N, K, T, block", [(4, 4, 64, 16), (4, 2, 45, 16), (6, 2, 37, 8), (4, 1, 40, 64)])
def test_outputs_and_gradients_equal_dot_product_attention(N, K, T, block):
    B = 3
    segments = packed_segments([[T // 3, T // 2], [T - 5], [7, 9, 2, 11]], T)  # padding at every row's end
    q, k, v, w = qkv(B, T, N, K)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # a different weight per output: specific gradients

    ours = lambda q, k, v: blockwise_attention(q, k, v, segments, block)  # noqa: E731
    ref = lambda q, k, v: reference(q, k, v, segments)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), atol=2e-6, rtol=1e-5)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, r, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"gradient w.r.t. {name}")


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
    q, k, v, _ = qkv(2, 48, 4, 2)
    segments = packed_segments([[20, 28], [48]], 48)
    out = blockwise_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), segments, 16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), reference(q, k, v, segments), atol=0.05)


def test_packed_conversations_are_isolated_bit_for_bit():
    """Changing one conversation's queries, keys and values changes nothing of the other's outputs or
    gradients, not even in the last bit (their shared tiles mask each other out exactly)."""
    T, block = 40, 16
    segments = packed_segments([[17, 20]], T)
    in_a = (segments == 1)[..., None, None]
    q, k, v, w = qkv(1, T, 4, 2)
    q2, k2, v2, _ = qkv(1, T, 4, 2, seed=1)
    changed = [jnp.where(in_a, new, old) for new, old in ((q2, q), (k2, k), (v2, v))]

    def out_and_grads(q, k, v):
        f = lambda q, k, v: blockwise_attention(q, k, v, segments, block)  # noqa: E731
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)

    (out, grads), (out2, grads2) = out_and_grads(q, k, v), out_and_grads(*changed)
    b = np.asarray(segments[0] == 2)
    np.testing.assert_array_equal(np.asarray(out)[0, b], np.asarray(out2)[0, b])
    for g, g2 in zip(grads, grads2):
        np.testing.assert_array_equal(np.asarray(g)[0, b], np.asarray(g2)[0, b])
    assert not np.allclose(np.asarray(out)[0, ~b], np.asarray(out2)[0, ~b])


def test_tiles_between_conversations_are_skipped():
    """Conversation A fills key block 0 exactly, B fills block 1: tile (1, 0) holds only A-B pairs. A NaN in
    A's values reaches A's outputs, and would reach B's (0 × NaN) if that tile were computed; it is not."""
    segments = packed_segments([[16, 16]], 32)
    q, k, v, _ = qkv(1, 32, 2, 2)
    v = v.at[0, 3].set(jnp.nan)
    out = np.asarray(blockwise_attention(q, k, v, segments, 16))
    assert np.isnan(out[0, 3:16]).all()  # A attends to the NaN (causally, from position 3 on)
    assert np.isfinite(out[0, 16:]).all()  # B never met it
    grad_q = jax.grad(lambda q: jnp.sum(blockwise_attention(q, k, v, segments, 16)[0, 16:]))(q)
    assert np.isfinite(np.asarray(grad_q)[0, 16:]).all()
    # the reference computes the whole square, so B's rows see 0 × NaN
    assert np.isnan(np.asarray(reference(q, k, v, segments))[0, 16:]).any()
