"""The f32-accumulating matmul: forward and custom backward equal plain f32 autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniecg_jax.layers.linear import einsum, matmul


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_matmul_gradients_match_f32_autodiff(dtype, tol):
    # Non-square on purpose: a wrongly transposed weight gradient cannot have the right shape.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 40))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (40, 3, 8)) / 6
    probe = jax.random.normal(jax.random.PRNGKey(2), (2, 24, 3, 8))

    def ours(x, kernel):
        return jnp.sum(matmul(x, kernel, (2,), (0,), dtype, jnp.float32) * probe)

    def reference(x, kernel):
        return jnp.sum(jnp.einsum("btd,dhk->bthk", x, kernel) * probe)

    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, kernel)
    want = jax.grad(reference, argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=tol * scale)


def test_einsum_gradients_match_f32_autodiff():
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4))
    k = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 7, 4))

    def ours(q, k):
        return jnp.sum(jnp.sin(einsum("btkd,bksd->bkts", q, k, jnp.bfloat16, jnp.float32)))

    def reference(q, k):
        return jnp.sum(jnp.sin(jnp.einsum("btkd,bksd->bkts", q, k)))

    for g, w in zip(jax.grad(ours, (0, 1))(q, k), jax.grad(reference, (0, 1))(q, k)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=0.1, rtol=0.05)
