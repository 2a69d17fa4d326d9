"""Which backend the ops are traced for, and which implementation each op takes there: the one table.

The platform is that of the devices the code is compiled for: the active mesh's (`sharding.activation_sharding`,
so an ahead-of-time compile for an abstract TPU topology on a CPU host picks the TPU kernels), else JAX's
default backend. `platform("tpu")` overrides it while tracing (tests use it to check what each backend traces).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

from agentlm_jax import sharding

_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("agentlm_ops_platform", default=None)


@contextlib.contextmanager
def platform(name: str) -> Iterator[None]:
    """Trace the ops as for platform `name` ("cpu", "gpu", "tpu") inside this context."""
    token = _OVERRIDE.set(name)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def current_platform() -> str:
    """The platform the ops choose implementations for."""
    return _OVERRIDE.get() or devices_platform()


def devices_platform() -> str:
    """The platform of the devices the code will run on (the override aside): a Pallas kernel of another
    platform runs in interpret mode there."""
    mesh = sharding.active_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def _family(platform_name: str) -> str:
    return "gpu" if platform_name in ("gpu", "cuda", "rocm") else platform_name


def projection_impl(platform_name: str) -> str:
    """`matmul_2d` (ops/cpu/matmul.py) on CPU; `einsum` (jnp.einsum, which sharding propagation sees) elsewhere."""
    return "matmul_2d" if _family(platform_name) == "cpu" else "einsum"


def attention_impl(requested: str, platform_name: str, *, cached: bool) -> str:
    """The attention kernel for `model.attention_impl` = `requested` on a platform.

    auto: `blockwise` (ops/cpu/blockwise_attention.py) on CPU; `splash` (ops/tpu/splash_attention.py) on TPU;
    on GPU `default`, i.e. `jax.nn.dot_product_attention(implementation=None)`, which takes cuDNN's flash
    attention where it supports the inputs; `xla` elsewhere. `blockwise` and `splash` compute self-attention
    over whole sequences only, so decoding with a KV cache (`cached`) takes `xla` in their place; so does the
    Pallas GPU kernel `flash` (ops/gpu/flash_attention.py), which only runs when asked for by name (it has not
    been run on a GPU by this project yet).
    """
    family = _family(platform_name)
    impl = requested
    if requested == "auto":
        impl = {"cpu": "blockwise", "tpu": "splash", "gpu": "default"}.get(family, "xla")
    if cached and impl in ("blockwise", "splash", "flash"):
        impl = "default" if family == "gpu" else "xla"
    return impl


def cross_entropy_impl(platform_name: str) -> str:
    """How the chunked losses loop over chunks: `cpu_fused` (ops/cpu/cross_entropy.py: a fori_loop over the
    needed chunks with the head's gradient computed in the forward pass) on CPU, a rematerialised `scan`
    with a `lax.cond` per chunk elsewhere."""
    return "cpu_fused" if _family(platform_name) == "cpu" else "scan"
