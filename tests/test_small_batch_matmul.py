"""kernels.small_batch_matmul: the FFI kernel against numpy, its injection into DenseGeneral."""
import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.kernels import small_batch_matmul
from uniecg_jax.layers.linear import DenseGeneral
from uniecg_jax.models.llm import Decoder, LLMConfig


@pytest.fixture(scope="module")
def kernel():
    if small_batch_matmul._compiler() is None:
        pytest.skip("no C++ compiler on PATH: the kernel is not built and XLA's dot is used")
    assert small_batch_matmul.load(), "a C++ compiler is present but the kernel failed to build"


@pytest.mark.parametrize("depth,width", [(37, 70), (512, 1100)])   # a column tail; helper threads
def test_matches_numpy_for_every_row_count(kernel, depth, width):
    rng = np.random.RandomState(0)
    w = rng.randn(depth, width).astype(np.float32)
    packed = jax.jit(small_batch_matmul.pack)(w)
    assert packed.shape == (-(-width // 32), depth, 32)
    for rows in range(1, 9):
        x = rng.randn(rows, depth).astype(np.float32)
        got = jax.jit(small_batch_matmul.matmul, static_argnums=2)(x, packed, width)
        want = x.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.sqrt(depth))


def test_rejects_shapes_it_cannot_take(kernel):
    packed = small_batch_matmul.pack(jnp.ones((16, 40)))
    with pytest.raises(ValueError, match="M <= 8"):
        small_batch_matmul.matmul(jnp.ones((9, 16)), packed, 40)
    with pytest.raises(ValueError, match="packed"):
        small_batch_matmul.matmul(jnp.ones((4, 16)), packed, 70)


@pytest.mark.parametrize("features,axis,x_shape", [
    ((3, 20), -1, (2, 3, 24)),          # q/k/v-like: [.., D] -> [.., H, Dh]
    (24, (-2, -1), (4, 1, 3, 20)),      # out-projection-like: [.., H, Dh] -> [.., D]
])
def test_dense_general_with_packed_kernels(kernel, features, axis, x_shape):
    layer = DenseGeneral(features, ("a", "b", "c"), axis=axis, use_bias=True,
                         bias_init=jax.nn.initializers.normal(1.0))
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    want = layer.apply({"params": params}, x)
    packed = small_batch_matmul.packed_dense_kernels(layer, params, x)
    assert list(packed) == [()]                    # the root layer's path

    def injected(x):
        with small_batch_matmul.packed_kernels_injected(packed):
            return layer.apply({"params": params}, x)
    got = jax.jit(injected)(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert small_batch_matmul.TARGET in jax.jit(injected).lower(x).as_text()
    # 12 rows: outside the kernel's range, XLA's dot again.
    wide = jnp.concatenate([x] * (12 // int(np.prod(x.shape[:-2 if axis != -1 else -1]))), 0)
    assert small_batch_matmul.TARGET not in jax.jit(injected).lower(wide).as_text()
    np.testing.assert_allclose(np.asarray(injected(wide)),
                               np.asarray(layer.apply({"params": params}, wide)), rtol=1e-6)


def test_injection_reaches_every_dense_of_a_decoder_except_scanned_ones(kernel):
    for scan_layers, expected in ((False, 2 * 7 + 1), (True, 1)):   # 7 Denses a layer + lm_head
        model = Decoder(LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                  num_layers=2, num_heads=4, num_kv_heads=2,
                                  scan_layers=scan_layers))
        ids = jnp.ones((3, 1), jnp.int32)
        params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids)["params"])
        packed = small_batch_matmul.packed_dense_kernels(model, params, ids)
        assert len(packed) == expected

        def step(params, ids):
            with small_batch_matmul.packed_kernels_injected(packed):
                return model.apply({"params": params}, ids)
        hlo = jax.jit(step).lower(params, ids).as_text()
        assert hlo.count(f"@{small_batch_matmul.TARGET}") == expected
        np.testing.assert_allclose(np.asarray(jax.jit(step)(params, ids)),
                                   np.asarray(model.apply({"params": params}, ids)),
                                   rtol=1e-5, atol=1e-5)


def test_usable_only_for_single_device_f32_small_batches(kernel):
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert small_batch_matmul.usable(f32, f32, 8, [jnp.ones(4)])
    assert not small_batch_matmul.usable(f32, f32, 1, [])          # XLA's gemv is as fast
    assert not small_batch_matmul.usable(f32, f32, 9, [])
    assert not small_batch_matmul.usable(bf16, f32, 4, [])
    assert not small_batch_matmul.usable(f32, bf16, 4, [])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.device_put(jnp.ones(4), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    assert not small_batch_matmul.usable(f32, f32, 4, [sharded])


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("UNIECG_SMALL_BATCH_KERNEL", "0")
    small_batch_matmul.load.cache_clear()
    try:
        assert not small_batch_matmul.load()
        assert not small_batch_matmul.usable(jnp.float32, jnp.float32, 4, [])
    finally:
        monkeypatch.delenv("UNIECG_SMALL_BATCH_KERNEL")
        small_batch_matmul.load.cache_clear()


def test_dense_general_alone_never_uses_the_kernel(kernel):
    layer = DenseGeneral(8, ("a", "b"))
    x = jnp.ones((4, 16))
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {"params"}
    assert small_batch_matmul.TARGET not in jax.jit(layer.apply).lower(variables, x).as_text()
    grad = jax.grad(lambda p: layer.apply({"params": p}, x).sum())(variables["params"])
    # d(sum x.W)/dW = the sum of x's rows
    np.testing.assert_allclose(np.asarray(grad["kernel"].unbox()), 4.0)
