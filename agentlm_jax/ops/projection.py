"""Projections of activations by a parameter: `project("BTD,DNH->BTNH", x, kernel)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from agentlm_jax.ops.cpu.matmul import project_2d
from agentlm_jax.ops.backend import current_platform, projection_impl

PROJECTION = "projection"  # checkpoint name of every projection's output (the save_dots remat policy keeps them)


def project(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """einsum(equation, x, kernel), where x's trailing dimensions are contracted with the kernel's leading ones,
    in order, and the output is x's other dimensions followed by the kernel's (any other equation is a
    ValueError). The output is named PROJECTION for the remat policies."""
    x_dims, rest = equation.split(",")
    kernel_dims, out_dims = rest.split("->")
    n = sum(d in kernel_dims for d in x_dims)
    if not n or x_dims[-n:] != kernel_dims[:n] or out_dims != x_dims[:-n] + kernel_dims[n:]:
        raise ValueError(f"project: {equation!r} does not contract x's trailing dimensions with the kernel's leading")
    if projection_impl(current_platform()) == "matmul_2d":
        y = project_2d(x, kernel, n)
    else:
        y = jnp.einsum(equation, x, kernel)
    return checkpoint_name(y, PROJECTION)
