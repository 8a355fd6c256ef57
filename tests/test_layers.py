"""Layers: the f32-accumulating matmul (forward and custom backward equal plain f32 autodiff), the
one LayerNorm and the one bidirectional attention core."""
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


def test_layer_norm_normalises_before_the_affine_map_like_torch():
    """The one LayerNorm computes ((x - mean) * rsqrt(var + eps)) * scale + bias in f32 (torch's
    order), not flax's (x - mean) * (rsqrt(var + eps) * scale), and matches torch.nn.LayerNorm."""
    torch = pytest.importorskip("torch")
    from uniecg_jax.layers.norms import LayerNorm

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 48)) * 3 + 1
    scale = jax.random.normal(jax.random.PRNGKey(1), (48,))
    bias = jax.random.normal(jax.random.PRNGKey(2), (48,))
    got = LayerNorm(epsilon=1e-5).apply({"params": {"scale": scale, "bias": bias}}, x)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    want = ((x - mean) * jax.lax.rsqrt(var + 1e-5)) * scale + bias
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    reference = torch.nn.LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(np.asarray(scale)))
        reference.bias.copy_(torch.tensor(np.asarray(bias)))
        torch_out = reference(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(np.asarray(got), torch_out, rtol=1e-5, atol=1e-5)


def test_bidirectional_attention_scales_scores_by_inverse_sqrt_head_dim_and_masks_keys():
    from uniecg_jax.layers.attention import bidirectional_attention

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    # Dh = 24: there `/ sqrt(Dh)` and `* Dh ** -0.5` round differently (for 8 they agree).
    query, key, value = (jax.random.normal(k, (2, 4, 3, 24)) for k in keys)
    key_mask = jnp.array([[True, True, False, True], [True, False, False, False]])
    got = jax.jit(bidirectional_attention, static_argnums=3)(query, key, value, jnp.float32,
                                                              key_mask)
    # The chosen order: f32 scores times Dh ** -0.5 (not divided by sqrt(Dh)), masked, softmax.
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    scores = jnp.where(key_mask[:, None, None, :], scores * 24 ** -0.5, jnp.finfo(jnp.float32).min)
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), value)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Masked keys carry no weight: changing their values changes nothing.
    poked = value.at[0, 2].set(100.0).at[1, 1:].set(-50.0)
    np.testing.assert_array_equal(np.asarray(bidirectional_attention(query, key, poked,
                                                                     jnp.float32, key_mask)),
                                  np.asarray(bidirectional_attention(query, key, value,
                                                                     jnp.float32, key_mask)))
    # Row 1 attends its only key: the context is that key's value for every query.
    np.testing.assert_allclose(np.asarray(got[1]), np.broadcast_to(np.asarray(value[1, :1]),
                                                                   (4, 3, 24)), rtol=1e-6)


def test_path_name_reads_dict_attribute_and_sequence_keys():
    from uniecg_jax.layers.params import path_name, path_parts
    from uniecg_jax.train.state import TrainState

    tree = TrainState(step=0, params={"layers": [{"kernel": 1}]}, opt_state=())
    (path, _), = [(p, leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
                  if leaf == 1]
    assert path_parts(path) == ("params", "layers", "0", "kernel")
    assert path_name(path) == "params/layers/0/kernel"
    assert path_name(path, ".") == "params.layers.0.kernel"
