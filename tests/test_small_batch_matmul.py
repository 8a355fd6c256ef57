"""kernels.small_batch_matmul: the FFI kernel against numpy, its injection into DenseGeneral."""
import json

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.kernels import native, small_batch_matmul
from uniecg_jax.layers.linear import DenseGeneral
from uniecg_jax.models.llm import Decoder, LLMConfig


@pytest.fixture(scope="module")
def kernel():
    if native.compiler() is None:
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


def kernel_products() -> dict[str, np.ndarray]:
    """x @ w through the loaded kernel for 1..8 rows, a column tail and helper threads."""
    rng, products = np.random.RandomState(0), {}
    for depth, width in ((37, 70), (512, 1100)):
        w = rng.randn(depth, width).astype(np.float32)
        packed = jax.jit(small_batch_matmul.pack)(w)
        for rows in range(1, 9):
            x = rng.randn(rows, depth).astype(np.float32)
            products[f"{depth}_{rows}"] = np.asarray(
                jax.jit(small_batch_matmul.matmul, static_argnums=2)(x, packed, width))
    return products


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"),
                    reason="the AVX2 build is an x86-64 build")
def test_avx2_build_equals_the_native_build(kernel, tmp_path):
    """The AVX2 code path (4 x 16 accumulator blocks; -march=x86-64-v3, whatever this host has)
    sums every output in the same order as the AVX-512 one: identical results, in a fresh process
    (one process loads one build of the kernel)."""
    import os
    import subprocess
    import sys

    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import numpy as np\n"
              "from test_small_batch_matmul import kernel_products, small_batch_matmul\n"
              "assert small_batch_matmul.load() and small_batch_matmul.kernel_march() == "
              f"'x86-64-v3'\nnp.savez({str(tmp_path / 'avx2.npz')!r}, **kernel_products())")
    env = dict(os.environ, UNIECG_KERNEL_MARCH="x86-64-v3", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)
    avx2 = np.load(tmp_path / "avx2.npz")
    for name, native in kernel_products().items():
        np.testing.assert_array_equal(avx2[name], native)


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


def test_eligible_only_for_single_device_f32_small_batches(kernel):
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert small_batch_matmul.eligible(f32, f32, 8, [jnp.ones(4)])
    assert small_batch_matmul.eligible(f32, f32, 1, [])     # one row too: the calibration decides
    assert not small_batch_matmul.eligible(f32, f32, 9, [])
    assert not small_batch_matmul.eligible(bf16, f32, 4, [])
    assert not small_batch_matmul.eligible(f32, bf16, 4, [])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.device_put(jnp.ones(4), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    assert not small_batch_matmul.eligible(f32, f32, 4, [sharded])


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("UNIECG_SMALL_BATCH_KERNEL", "0")
    small_batch_matmul.load.cache_clear()
    try:
        assert not small_batch_matmul.load()
        assert not small_batch_matmul.usable(jnp.float32, jnp.float32, 4, [], shapes=[(32, 48)])
    finally:
        monkeypatch.delenv("UNIECG_SMALL_BATCH_KERNEL")
        small_batch_matmul.load.cache_clear()


# --- Calibration: kernel or XLA's dot, by measurement ----------------------------------------
SHAPES = [(64, 96)] * 3 + [(96, 64)]


@pytest.fixture
def calibration(kernel, monkeypatch, tmp_path):
    """A fresh decision cache in tmp_path, no forcing variable, and `measured`: the number of
    calibration measurements so far. `slow(side)` makes "kernel" or "xla" 50 ms slower a call."""
    monkeypatch.setenv("UNIECG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("UNIECG_SMALL_BATCH_KERNEL", raising=False)
    monkeypatch.setattr(native, "_decisions", {})
    delays = {"kernel": 0.0, "xla": 0.0}
    monkeypatch.setattr(small_batch_matmul, "CALIBRATION_DELAY_S", delays)
    measure = small_batch_matmul._measure
    state = {"measured": 0}

    def counted(*args):
        state["measured"] += 1
        return measure(*args)
    monkeypatch.setattr(small_batch_matmul, "_measure", counted)

    class Calibration:
        cache = tmp_path

        @property
        def measured(self):
            return state["measured"]

        def slow(self, side):
            delays.update({"kernel": 0.0, "xla": 0.0, side: 0.05})
    return Calibration()


@pytest.mark.parametrize("slow_side,use_kernel", [("kernel", False), ("xla", True)])
def test_calibration_picks_the_faster_side_and_caches_it(calibration, slow_side, use_kernel):
    calibration.slow(slow_side)
    assert small_batch_matmul.calibrate(4, SHAPES) is use_kernel
    assert calibration.measured == 1
    [cached] = calibration.cache.glob("small_batch_matmul-choice-*.json")
    record = json.loads(cached.read_text())
    assert record["use_kernel"] is use_kernel
    assert record["rows"] == 4 and record["shapes"] == [[64, 96, 3], [96, 64, 1]]
    assert (record["kernel_s"] > record["xla_s"]) is (slow_side == "kernel")
    # Re-used: in this process, and from disk in a new one (the memo emptied); the other side made
    # slower now changes nothing until the key changes.
    calibration.slow("xla" if slow_side == "kernel" else "kernel")
    assert small_batch_matmul.calibrate(4, SHAPES) is use_kernel
    native._decisions.clear()
    assert small_batch_matmul.calibrate(4, list(reversed(SHAPES))) is use_kernel   # same family
    assert calibration.measured == 1
    # usable consults the decision.
    assert small_batch_matmul.usable(jnp.float32, jnp.float32, 4, [], shapes=SHAPES) is use_kernel
    assert calibration.measured == 1


def test_calibration_key_follows_cpu_source_jax_and_shapes(calibration, monkeypatch):
    for name in ("UNIECG_KERNEL_MARCH", "ATEN_CPU_CAPABILITY"):   # start uncapped
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    key = small_batch_matmul.calibration_key(4, SHAPES)
    assert small_batch_matmul.calibration_key(4, SHAPES[::-1]) == key
    assert small_batch_matmul.calibration_key(8, SHAPES) != key
    assert small_batch_matmul.calibration_key(4, SHAPES[:-1]) != key
    assert small_batch_matmul.calibration_key(4, SHAPES + [(64, 96)]) != key   # counts matter
    calibration.slow("xla")
    assert small_batch_matmul.calibrate(4, SHAPES)
    for module, name, value in ((small_batch_matmul, "_source_hash", "0" * 64),
                                (native, "cpu_model", "AMD EPYC 7B13"),
                                (native, "cpu_signature", "flags : fpu avx2")):
        with monkeypatch.context() as patched:
            patched.setattr(module, name, lambda value=value: value)
            assert small_batch_matmul.calibration_key(4, SHAPES) != key
            measured = calibration.measured
            calibration.slow("kernel")       # the new CPU / source measures the kernel slower
            assert not small_batch_matmul.calibrate(4, SHAPES)
            assert calibration.measured == measured + 1
            calibration.slow("xla")
    for name, value in (("XLA_FLAGS", "--xla_cpu_max_isa=AVX2"), ("ATEN_CPU_CAPABILITY", "avx2"),
                        ("UNIECG_KERNEL_MARCH", "x86-64-v3")):
        with monkeypatch.context() as patched:   # an ISA cap is another host's code path
            patched.setenv(name, value)
            assert small_batch_matmul.isa_caps()
            assert small_batch_matmul.calibration_key(4, SHAPES) != key
    monkeypatch.setenv("UNIECG_KERNEL_MARCH", "native")      # the default is no cap
    assert small_batch_matmul.isa_caps() == {}
    monkeypatch.setattr(jax, "__version__", "0.0.1")
    assert small_batch_matmul.calibration_key(4, SHAPES) != key


def test_a_corrupt_cached_decision_is_measured_again(calibration):
    calibration.slow("kernel")
    key = small_batch_matmul.calibration_key(4, SHAPES)
    path = calibration.cache / f"small_batch_matmul-choice-{key}.json"
    path.write_text("{not json")
    assert not small_batch_matmul.calibrate(4, SHAPES)
    assert calibration.measured == 1 and json.loads(path.read_text())["use_kernel"] is False


def test_forcing_skips_calibration_and_ineligible_cases_never_calibrate(calibration, monkeypatch):
    calibration.slow("kernel")
    traced = []

    def shapes():
        traced.append(1)
        return SHAPES
    monkeypatch.setenv("UNIECG_SMALL_BATCH_KERNEL", "1")
    assert small_batch_matmul.usable(jnp.float32, jnp.float32, 4, [], shapes=shapes)
    monkeypatch.delenv("UNIECG_SMALL_BATCH_KERNEL")
    for dtype, rows in ((jnp.float32, 0), (jnp.float32, 9), (jnp.bfloat16, 4)):
        assert not small_batch_matmul.usable(dtype, jnp.float32, rows, [], shapes=shapes)
    assert not small_batch_matmul.usable(jnp.float32, jnp.float32, 4, [], shapes=())
    assert calibration.measured == 0 and not traced
    assert not small_batch_matmul.usable(jnp.float32, jnp.float32, 4, [], shapes=shapes)
    assert calibration.measured == 1 and traced == [1]


def test_dense_matmul_shapes_are_the_packed_kernels(kernel):
    model = Decoder(LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                              num_heads=4, num_kv_heads=2))
    ids = jnp.ones((3, 1), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids)["params"])
    shapes = small_batch_matmul.dense_matmul_shapes(model, params, ids)
    packed = small_batch_matmul.packed_dense_kernels(model, params, ids)
    assert len(shapes) == len(packed) == 2 * 7 + 1
    for (depth, width), tiles in zip(shapes, packed.values()):
        assert tiles.shape == (-(-width // 32), depth, 32)
    # q, o [32, 32]; k, v [32, 2 kv heads x 8]; gate, up [32, 48]; down [48, 32]; lm_head [32, 64]
    assert sorted(set(shapes)) == [(32, 16), (32, 32), (32, 48), (32, 64), (48, 32)]
    assert shapes.count((32, 16)) == 4 and shapes.count((48, 32)) == 2


def test_cpu_description_reads_proc_cpuinfo(monkeypatch):
    monkeypatch.setattr(native, "_cpuinfo_field", lambda *names: {
        "model name": "model name\t: AMD EPYC 7B13",
        "flags": "flags\t\t: fpu sse avx avx2 fma"}.get(names[0]))
    assert small_batch_matmul.cpu_model() == "AMD EPYC 7B13"
    assert small_batch_matmul.cpu_isa() == ["AVX2"]
    monkeypatch.setattr(native, "_cpuinfo_field", lambda *names: {
        "flags": "flags : avx2 avx512f avx512bw amx_tile amx_bf16"}.get(names[0]))
    assert small_batch_matmul.cpu_isa() == ["AVX2", "AVX-512", "AMX"]


def test_dense_general_alone_never_uses_the_kernel(kernel):
    layer = DenseGeneral(8, ("a", "b"))
    x = jnp.ones((4, 16))
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {"params"}
    assert small_batch_matmul.TARGET not in jax.jit(layer.apply).lower(variables, x).as_text()
    grad = jax.grad(lambda p: layer.apply({"params": p}, x).sum())(variables["params"])
    # d(sum x.W)/dW = the sum of x's rows
    np.testing.assert_allclose(np.asarray(grad["kernel"].unbox()), 4.0)
