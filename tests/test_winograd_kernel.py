"""kernels.winograd_conv: the fused Winograd FFI kernel against float64 convolutions, its use by
the conv layers and the VAE decoder (filters prepared once), and the measured decision."""
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from uniecg_jax.kernels import native, winograd_conv
from uniecg_jax.layers.conv import Conv1d, UpsampledConv1d
from uniecg_jax.models.vae import VAE, VAEConfig, native_decoder, prepare_decoder


@pytest.fixture(scope="module")
def kernel():
    if native.compiler() is None:
        pytest.skip("no C++ compiler on PATH: the kernel is not built and XLA's convs are used")
    assert winograd_conv.load(), "a C++ compiler is present but the kernel failed to build"


def reference_conv(x, kernel, bias, left, out_length):
    """float64 `y[b, t, o] = bias[o] + sum_k x[b, t + k - left, :] . kernel[k]` (zeros outside)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    width = kernel.shape[0]
    padded = np.pad(x, ((0, 0), (left, out_length + width - 1 - left - x.shape[1]), (0, 0)))
    return bias + sum(padded[:, k:k + out_length] @ kernel[k] for k in range(width))


def reference_moments(y):
    """float64 per-sample channel means and summed squared deviations `[B, 2, C]`."""
    mean = y.mean(axis=1)
    return np.stack([mean, np.square(y - mean[:, None]).sum(axis=1)], axis=1)


def silu64(v):
    return v / (1.0 + np.exp(-v))


# Channel counts off the vector and panel widths, one or many tiles and work items, both widths;
# plain, and with the activation prologue and residual epilogue.
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("batch,length,cin,cout,width,left,right", [
    (1, 5, 3, 7, 3, 1, 1), (2, 37, 19, 40, 3, 1, 1), (3, 64, 24, 33, 3, 0, 2),
    (5, 50, 64, 48, 2, 1, 0), (4, 23, 9, 16, 2, 0, 1)])
def test_conv_matches_float64(kernel, batch, length, cin, cout, width, left, right, fused):
    rng = np.random.RandomState(0)
    x = rng.randn(batch, length, cin).astype(np.float32)
    w = (rng.randn(width, cin, cout) / np.sqrt(width * cin)).astype(np.float32)
    b = rng.randn(cout).astype(np.float32)
    out_length = length + left + right - width + 1
    # Means well off zero: the moments must not lose them to cancellation.
    scale, shift, residual = (rng.randn(batch, cin).astype(np.float32),
                              (3 * rng.randn(batch, cin)).astype(np.float32),
                              (rng.randn(batch, out_length, cout) + 20).astype(np.float32))
    extra = dict(input_affine=(scale, shift), residual=residual) if fused else {}
    y, moments = winograd_conv.conv(x, winograd_conv.pack([w], 6), b, [left], width, 6,
                                    out_length, cout, **extra)
    # Zero padding pads the activation (silu(shift) is not zero).
    a = silu64(np.float64(x) * scale[:, None] + shift[:, None]) if fused else x
    ref = reference_conv(a, w, b, left, out_length) + (residual if fused else 0.0)
    assert y.shape == ref.shape and moments.shape == (batch, 2, cout)
    assert np.abs(np.asarray(y) - ref).max() <= 2e-5 * np.abs(ref).max()
    # The moments of what was written, to f32 summation precision: the means sit 20 standard
    # deviations off zero, where sums of squares taken unshifted in f32 lose ~400x more.
    expected = reference_moments(np.float64(y))
    np.testing.assert_allclose(moments, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_phases_are_interleaved(kernel):
    """P = 2: output sample 2 i + p is phase p's sample i, each phase with its own filters/pad;
    the moments are over both phases."""
    rng = np.random.RandomState(1)
    x = rng.randn(2, 30, 12).astype(np.float32)
    w0, w1 = (rng.randn(2, 12, 20).astype(np.float32) for _ in range(2))
    b = rng.randn(20).astype(np.float32)
    y, moments = winograd_conv.conv(x, winograd_conv.pack([w0, w1], 6), b, [1, 0], 2, 6, 30, 20)
    y = np.asarray(y)
    for phase, (w, left) in enumerate([(w0, 1), (w1, 0)]):
        ref = reference_conv(x, w, b, left, 30)
        assert np.abs(y[:, phase::2] - ref).max() <= 2e-5 * np.abs(ref).max()
    expected = reference_moments(np.float64(y))
    np.testing.assert_allclose(moments, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("layer", [Conv1d(24, 3, algorithm="winograd"),
                                   UpsampledConv1d(24, 3, algorithm="winograd")])
def test_layers_run_the_kernel_with_the_same_params(kernel, layer):
    x = jnp.asarray(np.random.RandomState(2).randn(3, 40, 16), jnp.float32)
    params = layer.init(jax.random.PRNGKey(0), x)
    native_layer = layer.clone(native=True)
    assert jax.tree.structure(native_layer.init(jax.random.PRNGKey(0), x)) == \
        jax.tree.structure(params)   # init stores no prepared filters
    lowered = jax.jit(native_layer.apply).lower(params, x).as_text()
    assert winograd_conv.TARGET in lowered    # the kernel runs, not XLA's Winograd
    y, y_xla = native_layer.apply(params, x), layer.apply(params, x)
    assert np.abs(np.asarray(y) - np.asarray(y_xla)).max() <= 2e-5 * np.abs(y_xla).max()


def test_layer_prologue_and_epilogue_match_xla(kernel):
    """Conv1d(input_affine, residual, with_moments): the kernel and XLA compute the same thing."""
    rng = np.random.RandomState(4)
    x = jnp.asarray(rng.randn(3, 40, 16), jnp.float32)
    affine = tuple(jnp.asarray(rng.randn(3, 16), jnp.float32) for _ in range(2))
    residual = jnp.asarray(rng.randn(3, 40, 24) + 5, jnp.float32)
    layer = Conv1d(24, 3, algorithm="winograd")
    params = layer.init(jax.random.PRNGKey(0), x)
    call = dict(input_affine=affine, residual=residual, with_moments=True)
    (y, moments), (y_xla, moments_xla) = (module.apply(params, x, **call)
                                          for module in (layer.clone(native=True), layer))
    assert np.abs(np.asarray(y) - np.asarray(y_xla)).max() <= 2e-5 * np.abs(y_xla).max()
    np.testing.assert_allclose(moments, moments_xla, rtol=2e-5, atol=1e-4)
    plain = layer.apply(params, x)     # the prologue and epilogue did something
    assert not np.allclose(plain, y, atol=1e-2)


TINY = VAEConfig(widths=(16, 32), num_res_blocks=1, num_groups=8, conv_algorithm="winograd")


def tiny_vae():
    vae = VAE(TINY)
    variables = vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 12)))
    latent = jnp.asarray(np.random.RandomState(3).randn(3, 16, 4), jnp.float32)
    return vae, variables, latent


def test_decoder_with_prepared_filters_matches_xla(kernel):
    vae, variables, latent = tiny_vae()
    assert set(variables) == {"params"}
    fused = vae.clone(native_winograd=True)
    prepared = prepare_decoder(fused, variables, latent.shape)
    assert set(prepared) == {"params", "prepared"}
    assert prepared["prepared"]       # one packed filter set per Winograd conv of the decoder
    assert prepare_decoder(vae, variables, latent.shape) is variables   # XLA: nothing to prepare
    expected = np.asarray(vae.apply(variables, latent, method=VAE.decode))
    for v in (prepared, variables):   # prepared filters, or packed inside the call: the same
        got = np.asarray(fused.apply(v, latent, method=VAE.decode))
        assert np.abs(got - expected).max() <= 2e-5 * np.abs(expected).max()
    # Every norm but one takes the moments the kernel summed as it wrote its input: only the norm
    # after the attention block (no kernel writes its input) reduces over positions itself.
    reductions = [eqn for eqn in jax.make_jaxpr(
        lambda v: fused.apply(v, latent, method=VAE.decode))(prepared).eqns
        if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.ndim == 3
        and 1 in eqn.params["axes"]]
    assert len(reductions) == 2           # its mean and its variance
    # The prepared filters are what the decode uses: zeroing them changes the output.
    zeroed = {**prepared, "prepared": jax.tree.map(jnp.zeros_like, prepared["prepared"])}
    assert not np.allclose(fused.apply(zeroed, latent, method=VAE.decode), expected, atol=1e-3)


@pytest.fixture
def calibration(kernel, monkeypatch, tmp_path):
    """A fresh decision cache, no forcing variable; `slow(side)` makes one side 50 ms slower."""
    monkeypatch.setenv("UNIECG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("UNIECG_WINOGRAD_KERNEL", raising=False)
    monkeypatch.setattr(native, "_decisions", {})
    delays = {"kernel": 0.0, "xla": 0.0}
    monkeypatch.setattr(winograd_conv, "CALIBRATION_DELAY_S", delays)

    class Calibration:
        cache = tmp_path

        def slow(self, side):
            delays.update({"kernel": 0.0, "xla": 0.0, side: 0.05})
    return Calibration()


@pytest.mark.parametrize("slow_side,use_kernel", [("kernel", False), ("xla", True)])
def test_native_decoder_is_chosen_by_measurement_and_cached(calibration, slow_side, use_kernel):
    vae, variables, latent = tiny_vae()
    calibration.slow(slow_side)
    chosen, chosen_vars = native_decoder(vae, variables, latent.shape)
    assert chosen.native_winograd is use_kernel
    assert ("prepared" in chosen_vars) is use_kernel
    [cached] = calibration.cache.glob("winograd_conv-choice-*.json")
    record = json.loads(cached.read_text())
    assert record["use_kernel"] is use_kernel and record["latent"] == [3, 16, 4]
    # Re-used from disk: the other side made slower changes nothing until the key changes.
    calibration.slow("xla" if slow_side == "kernel" else "kernel")
    native._decisions.clear()
    assert native_decoder(vae, variables, latent.shape)[0].native_winograd is use_kernel
    assert len(list(calibration.cache.glob("winograd_conv-choice-*.json"))) == 1
    # Another batch is another decision.
    native_decoder(vae, variables, (5, 16, 4))
    assert len(list(calibration.cache.glob("winograd_conv-choice-*.json"))) == 2


def test_only_winograd_vaes_and_switched_off_by_environment(calibration, monkeypatch):
    vae, variables, latent = tiny_vae()
    direct = VAE(TINY.replace(conv_algorithm="direct"))
    assert native_decoder(direct, variables, latent.shape) == (direct, variables)
    monkeypatch.setenv("UNIECG_WINOGRAD_KERNEL", "0")
    assert not winograd_conv.load()
    assert native_decoder(vae, variables, latent.shape) == (vae, variables)
    monkeypatch.setenv("UNIECG_WINOGRAD_KERNEL", "1")    # forced: no measurement
    chosen, chosen_vars = native_decoder(vae, variables, latent.shape)
    assert chosen.native_winograd and "prepared" in chosen_vars
    assert not list(calibration.cache.glob("winograd_conv-choice-*.json"))
    assert not winograd_conv.eligible(jnp.bfloat16)
