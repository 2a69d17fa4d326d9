"""A projection einsum as one 2-D matmul [M,I] @ [I,O], with the kernel's gradient in the kernel's own layout.

On XLA:CPU this beats the einsum: the einsum's backward pass contracts over B and T as two dimensions, and
autodiff computes the kernel's gradient as [O,I] and transposes it, a transpose XLA:CPU fuses into each
optimizer update that reads the gradient (strided reads, several times slower). The reshapes are of
contiguous arrays, so free. On other backends the reshape would hide the einsum's structure from sharding
propagation, so they never take this path (ops.backend).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def project_2d(x: jax.Array, kernel: jax.Array, contracted: int) -> jax.Array:
    """x's trailing `contracted` dimensions against the kernel's leading ones: [*lead, *out]."""
    lead, out = x.shape[:-contracted], kernel.shape[contracted:]
    y = _matmul(x.reshape(math.prod(lead), -1), kernel.reshape(math.prod(kernel.shape[:contracted]), -1))
    return y.reshape(*lead, *out)


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("MI,IO->MO", x, kernel)


def _matmul_fwd(x, kernel):
    return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, g):
    x, kernel = residuals
    return jnp.einsum("MO,IO->MI", g, kernel), jnp.einsum("MI,MO->IO", x, g)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
