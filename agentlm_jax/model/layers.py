"""Primitives of the Llama architecture: parameters with logical axes, RMSNorm, token embedding, output head,
rotary positions (with Llama 3.1's frequency scaling).

Dimension letters used in every einsum of this package:
  B batch · T query length · S key/value length · D model width (hidden_size) · F MLP width
  N query heads · K key/value heads · H head dim · V vocabulary · L layers
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from agentlm_jax.config.schema import RopeScaling
from agentlm_jax.sharding import constrain


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
    """A parameter annotated with its logical axis names (`out_sharding` metadata).

    The names are *logical* (`embed`, `heads`, ...); `sharding.state_shardings` maps them to mesh axes by the
    rules table, so the model never names a mesh axis. `eager_sharding=False` keeps Flax from treating them
    as mesh axes when the variable is created.
    """
    if len(shape) != len(axes):
        raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} axis names, got {tuple(axes)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 and cast back (as Hugging Face's LlamaRMSNorm does)."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Embedder(nnx.Module):
    """Token ids → vectors. With tied embeddings (`tie_word_embeddings`) `attend` is also the output head."""

    def __init__(self, vocab_size: int, dim: int, *, init, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, init, (vocab_size, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding[...].astype(self.dtype), tokens, axis=0)  # [B,T,D]
        return constrain(x, ("batch", "seq", "act_embed"))

    def attend(self, h: jax.Array) -> jax.Array:
        """Hidden states → float32 logits through the embedding table (the tied output head)."""
        logits = jnp.einsum("BTD,VD->BTV", h.astype(self.dtype), self.embedding[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab"))


class LMHead(nnx.Module):
    """Hidden states → float32 logits. `kernel` is [D, V] with logical axes ('embed', 'vocab')."""

    def __init__(self, dim: int, vocab_size: int, *, init, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = param(rngs, init, (dim, vocab_size), ("embed", "vocab"), param_dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        logits = jnp.einsum("BTD,DV->BTV", h.astype(self.dtype), self.kernel[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab"))


# ----------------------------------------------------------------------------- rotary position embedding
# Hugging Face layout ("rotate_half"): a head vector's first half and second half form the (x, y) pairs that
# are rotated, frequency i pairing element i with element i + H/2. Hugging Face's Llama checkpoints store
# q_proj/k_proj already permuted for this layout, so using it here means import and export copy q/k weights
# as they are: no permutation in either direction. (Meta's original checkpoints interleave pairs instead.)
def rotary_angles(positions: jax.Array, head_dim: int, theta: float,
                  scaling: RopeScaling = RopeScaling()) -> tuple[jax.Array, jax.Array]:
    """cos and sin of each position's rotation angles, float32 [B,T,H] for integer positions [B,T]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    if scaling.rope_type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = jnp.einsum("BT,F->BTF", positions.astype(jnp.float32), inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B,T,H]
    return jnp.cos(angles), jnp.sin(angles)


def llama3_inv_freq(inv_freq: jax.Array, s: RopeScaling) -> jax.Array:
    """Llama 3.1's frequency scaling, step for step as transformers' `_compute_llama3_parameters` (float32):
    wavelengths above original/low_freq_factor are stretched by `factor`, those below original/high_freq_factor
    kept, and those between interpolated by a smooth factor."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate query or key heads x [B,T,N,H] by the angles of their positions (cos, sin [B,T,H])."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated_half = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None, :] + rotated_half * sin[:, :, None, :]
    return out.astype(x.dtype)
