"""The XLA attention paths of `ops.attention` against `jax.nn.dot_product_attention` with the packed-sequence
mask: the causal query chunks taken when the queries' first slot is known when tracing (a prefill into an empty
cache), and `cached_attention` over a cache laid out [B,K,S,H] (the decoding path), at dynamic slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentlm_jax import ops
from agentlm_jax.ops.masking import attention_mask
from tests.ops.test_attention import packed_segments


def reference(q, k, v, q_segments, kv_segments, q_start):
    mask = attention_mask(q_segments, kv_segments, q_start + jnp.arange(q.shape[1]), jnp.arange(k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("T, S", [(300, 300), (256, 320), (100, 100)])
def test_causal_chunks_equal_one_dense_call(T, S):
    """T queries from slot 0 over S >= T keys (the later ones empty, as in a cache): cut in chunks (T >= 256:
    two) where each skips the keys after it; every output equals the dense call's."""
    B, N, K, H = 2, 4, 2, 16
    q, k, v = normal(0, (B, T, N, H)), normal(1, (B, S, K, H)), normal(2, (B, S, K, H))
    left = np.zeros((B, T), np.int32)  # left-padded prompts, as the generator builds them
    left[0, T - T // 3:], left[1, 7:] = 1, 1
    q_seg = jnp.asarray(left)
    kv_seg = jnp.zeros((B, S), jnp.int32).at[:, :T].set(q_seg)
    got = jax.jit(lambda q, k, v: ops.attention(q, k, v, q_seg, kv_segment_ids=kv_seg, impl="xla"))(q, k, v)
    want = reference(q, k, v, q_seg, kv_seg, 0)
    real = np.asarray(q_seg, bool)  # padding rows see only padding: no output of theirs is ever read
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6, rtol=1e-5)
    # queries that start later (a Python int): each chunk still sees every earlier key
    start = 37
    kv_seg = jnp.zeros((B, S + start), jnp.int32).at[:, :start].set(1).at[:, start:start + T].set(q_seg)
    kl, vl = normal(6, (B, S + start, K, H)), normal(7, (B, S + start, K, H))
    got = jax.jit(lambda q, k, v: ops.attention(q, k, v, q_seg, kv_segment_ids=kv_seg, q_start=start,
                                                impl="xla"))(q, kl, vl)
    want = reference(q, kl, vl, q_seg, kv_seg, start)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6, rtol=1e-5)
    # and in training (packed conversations, self-attention): all rows, padding included
    seg = packed_segments([[T // 3, T // 2], [T - 5]], T)
    got = jax.jit(lambda q, k, v: ops.attention(q, k, v, seg, impl="xla"))(q, k[:, :T], v[:, :T])
    np.testing.assert_allclose(got, reference(q, k[:, :T], v[:, :T], seg, seg, 0), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("N, K, T", [(4, 2, 1), (4, 4, 1), (6, 2, 3), (4, 1, 5)])
def test_cached_attention_equals_dot_product_attention(N, K, T):
    B, S, H = 3, 40, 16
    q, k, v = normal(3, (B, T, N, H)), normal(4, (B, S, K, H)), normal(5, (B, S, K, H))
    kv_seg = np.zeros((B, S), np.int32)
    kv_seg[0, 5:30], kv_seg[1, :30], kv_seg[2, 20:30] = 1, 1, 1  # left padding of different lengths
    kv_seg[:, 30:30 + T] = 1  # the new tokens' slots
    kv_seg = jnp.asarray(kv_seg)
    q_seg = jnp.ones((B, T), jnp.int32)
    # the cache as the model keeps it ([B,K,S,H]), the queries' slot traced (as in the decode loop)
    got = jax.jit(lambda q, k, v, start: ops.cached_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                                              q_seg, kv_seg, start))(q, k, v, jnp.int32(30))
    np.testing.assert_allclose(got, reference(q, k, v, q_seg, kv_seg, 30), atol=2e-6, rtol=1e-5)
