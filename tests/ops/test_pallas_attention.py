"""The Pallas attention kernels, run by Pallas' interpreter on the CPU: the TPU splash kernel
(ops/tpu/splash_attention.py) and the GPU flash kernel (ops/gpu/flash_attention.py). For each: values and
gradients equal `jax.nn.dot_product_attention` with our packed causal mask (grouped-query heads), nothing leaks
between packed conversations, the sharded call (batch and heads over the mesh) equals the unsharded one; and
`ops.attention` takes splash for a TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentlm_jax import ops
from agentlm_jax.config import DEFAULT_RULES, MeshConfig
from agentlm_jax.ops.gpu.flash_attention import flash_attention
from agentlm_jax.ops.masking import attention_mask
from agentlm_jax.ops.tpu.splash_attention import splash_attention, supports
from agentlm_jax.sharding import make_mesh

KERNELS = {"splash": splash_attention, "flash": flash_attention}

B, T, N, K, H = 2, 256, 4, 2, 64


def operands(seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    seg = np.ones((B, T), np.int32)
    seg[0, 100:] = 2  # two packed conversations in row 0
    seg[1, 200:] = 0  # padding at the end of row 1
    return q, k, v, jnp.asarray(seg)


def reference(q, k, v, seg):
    slots = jnp.arange(q.shape[1])
    return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(seg, seg, slots, slots))


def run(kernel, q, k, v, seg, mesh=None, rules=None):
    return KERNELS[kernel](q, k, v, seg, block_size=128, mesh=mesh, rules=rules, interpret=True)


@pytest.fixture(scope="module")
def data():
    return operands()


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_values_and_gradients_equal_dot_product_attention(data, kernel):
    q, k, v, seg = data
    attend = lambda *a: run(kernel, *a)  # noqa: E731
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(attend(q, k, v, seg))[real], np.asarray(reference(q, k, v, seg))[real],
                               atol=2e-5, rtol=0)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)) * real[..., None, None], jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, seg) * weights)  # noqa: E731
    got = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_no_attention_crosses_a_conversation_boundary(data, kernel):
    q, k, v, seg = data
    attend = lambda *a: run(kernel, *a)  # noqa: E731
    out = np.asarray(attend(q, k, v, seg))
    # Change everything of the second conversation of row 0: the first's outputs must not move at all.
    k2 = k.at[0, 100:].set(-k[0, 100:] * 3.0)
    v2 = v.at[0, 100:].set(v[0, 100:] + 5.0)
    out2 = np.asarray(attend(q, k2, v2, seg))
    np.testing.assert_array_equal(out2[0, :100], out[0, :100])
    assert np.abs(out2[0, 100:] - out[0, 100:]).max() > 0.1  # and the change is seen where it should be


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=1, fsdp=2, tensor=2), MeshConfig(data=2, fsdp=1, tensor=2)],
                         ids=["fsdp2-tensor2", "data2-tensor2"])
def test_the_sharded_kernel_equals_the_unsharded(data, mesh_cfg, kernel):
    q, k, v, seg = data
    mesh = make_mesh(mesh_cfg, jax.devices()[:4])
    sharded = jax.jit(lambda *a: run(kernel, *a, mesh=mesh, rules=DEFAULT_RULES))(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(run(kernel, q, k, v, seg)), atol=1e-6, rtol=0)


def test_ops_attention_takes_splash_for_a_tpu_and_xla_where_it_cannot(data):
    q, k, v, seg = data
    with ops.platform("tpu"):
        traced = str(jax.make_jaxpr(lambda *a: ops.attention(*a, splash_block_size=128))(q, k, v, seg))
        short = str(jax.make_jaxpr(lambda *a: ops.attention(*a))(q[:, :33], k[:, :33], v[:, :33], seg[:, :33]))
    assert "pallas_call" in traced
    assert "pallas_call" not in short  # 33 positions: not whole blocks of 128, so XLA's attention
    assert supports(4096, 512) and supports(256, 512) and not supports(100, 512) and not supports(64, 64)
