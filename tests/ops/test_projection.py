"""ops.project: the CPU's 2-D matmul with its hand-written backward pass and the plain einsum of the other
backends give the einsum's values and gradients; an equation that is not a projection is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentlm_jax import ops


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("equation, x_shape, kernel_shape", [
    ("BTD,DF->BTF", (2, 5, 6), (6, 7)),
    ("BTD,DNH->BTNH", (2, 5, 6), (6, 3, 4)),
    ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 6)),
])
def test_project_equals_einsum_and_its_gradients(equation, x_shape, kernel_shape, platform):
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=kernel_shape).astype(np.float32)
    weights = rng.normal(size=jnp.einsum(equation, x, kernel).shape).astype(np.float32)

    def loss(fn):
        return jax.value_and_grad(lambda a, b: jnp.sum(fn(equation, a, b) * weights), argnums=(0, 1))(x, kernel)

    with ops.platform(platform):
        value, grads = loss(ops.project)
        traced = str(jax.make_jaxpr(lambda a, b: ops.project(equation, a, b))(x, kernel))
    ref_value, ref_grads = loss(jnp.einsum)
    assert ("custom_vjp_call" in traced) == (platform == "cpu")  # the CPU kernel only where it is meant to run
    assert value == pytest.approx(float(ref_value), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_project_rejects_an_equation_that_is_not_a_projection():
    with pytest.raises(ValueError, match="trailing dimensions"):
        ops.project("BTD,FD->BTF", jnp.ones((1, 2, 3)), jnp.ones((4, 3)))
