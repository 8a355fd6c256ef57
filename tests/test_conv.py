"""Convolutions: the Winograd transforms are exact in float64, the f32 Winograd conv stays within a
measured bound of a float64 reference, the VAE gives the same decode with either algorithm, and a
wrong algorithm name fails with a clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniecg_jax.errors import ConfigError
from uniecg_jax.layers import conv
from uniecg_jax.models.vae import Decoder, VAEConfig


@pytest.mark.parametrize("m,r", [(2, 2), (4, 2), (6, 2), (2, 3), (4, 3), (6, 3), (3, 5)])
def test_winograd_transforms_compute_correlation_exactly_in_float64(m, r):
    transform_at, transform_g, transform_bt = conv.winograd_transforms(m, r)
    n = m + r - 1
    assert transform_at.shape == (m, n) and transform_g.shape == (n, r)
    assert transform_bt.shape == (n, n)
    rng = np.random.default_rng(m * 10 + r)
    for _ in range(5):
        tile, taps = rng.standard_normal(n), rng.standard_normal(r)
        got = transform_at @ ((transform_g @ taps) * (transform_bt @ tile))
        np.testing.assert_allclose(got, np.correlate(tile, taps, "valid"), rtol=0, atol=1e-12)


def test_winograd_f43_is_lavin_and_grays_table():
    # Points 0, +-1, +-2 and infinity give the B^T printed in Lavin & Gray (2016), eq. (7).
    _, _, transform_bt = conv.winograd_transforms(4, 3)
    np.testing.assert_array_equal(transform_bt, [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0],
                                                 [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                                                 [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])


def _reference_conv(x, kernel, padding):
    """Float64 stride-1 conv `[B, L, C_in] x [r, C_in, C_out]` (numpy)."""
    x = np.pad(x.astype(np.float64), ((0, 0), padding, (0, 0)))
    length = x.shape[1] - kernel.shape[0] + 1
    return sum(np.einsum("blc,co->blo", x[:, j:j + length], kernel[j].astype(np.float64))
               for j in range(kernel.shape[0]))


@pytest.mark.parametrize("width,padding", [(2, (0, 1)), (2, (1, 0)), (3, (1, 1))])
@pytest.mark.parametrize("length", [5, 12, 13, 37])
@pytest.mark.parametrize("channels", [(8, 16), (32, 24)])
@pytest.mark.parametrize("tile", [None, 4])   # the default F(6, r), and F(4, r)
def test_winograd_conv_matches_float64_reference(width, padding, length, channels, tile):
    rng = np.random.default_rng(length)
    x = rng.standard_normal((2, length) + channels[:1]).astype(np.float32)
    kernel = (rng.standard_normal((width,) + channels) / np.sqrt(width * channels[0])
              ).astype(np.float32)
    bias = rng.standard_normal(channels[1]).astype(np.float32)
    want = _reference_conv(x, kernel, padding) + bias
    got = np.asarray(conv._winograd_conv(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias),
                                         padding, jnp.float32, tile))
    assert got.shape == want.shape
    # Measured over these shapes (3 seeds): max |error| / max |reference| 2.1e-6 for F(6, r),
    # 1.6e-6 for F(4, r), 6e-7 for the direct conv; a wrong transform entry gives ~1e-1.
    assert np.abs(got - want).max() / np.abs(want).max() < 5e-6


def test_conv_modules_take_the_same_params_with_either_algorithm():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 13, 8)), jnp.float32)
    for make in (lambda a: conv.Conv1d(16, 3, algorithm=a),
                 lambda a: conv.UpsampledConv1d(16, 3, algorithm=a),
                 lambda a: conv.Conv1d(16, 1, algorithm=a)):
        params = make("direct").init(jax.random.PRNGKey(0), x)
        assert (jax.tree_util.tree_structure(make("winograd").init(jax.random.PRNGKey(0), x))
                == jax.tree_util.tree_structure(params))
        direct, winograd = make("direct").apply(params, x), make("winograd").apply(params, x)
        assert winograd.shape == direct.shape
        np.testing.assert_allclose(winograd, direct, rtol=0, atol=5e-6 * np.abs(direct).max())


def test_vae_decode_with_winograd_equals_direct():
    cfg = VAEConfig(widths=(16, 32, 64), num_res_blocks=1, num_groups=8)
    latent = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 4)), jnp.float32)
    params = jax.jit(Decoder(cfg).init)(jax.random.PRNGKey(0), latent)
    decode = {algorithm: np.asarray(jax.jit(Decoder(cfg.replace(conv_algorithm=algorithm)).apply)(
        params, latent)) for algorithm in ("direct", "winograd")}
    # Measured (3 seeds, this config and widths 32/64/128): max |difference| / max |direct|
    # 1.5e-6 .. 7.7e-6.
    difference = np.abs(decode["winograd"] - decode["direct"]).max()
    assert difference < 3e-5 * np.abs(decode["direct"]).max()


def test_conv_algorithm_is_checked_and_old_configs_load():
    with pytest.raises(ConfigError, match=r"model\.vae\.conv_algorithm='fft'.*direct, winograd"):
        VAEConfig.from_config({"conv_algorithm": "fft"})
    with pytest.raises(ValueError, match=r"conv algorithm 'fft'; choose from direct, winograd"):
        conv.Conv1d(4, 3, algorithm="fft").init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 2)))
    old = {k: v for k, v in VAEConfig().to_dict().items() if k != "conv_algorithm"}
    assert VAEConfig.from_config(old).conv_algorithm == "direct"
