"""Beat-phase features (diffusion/rhythm.py), the rhythm-conditioned UNet and the data path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniecg_jax.diffusion import rhythm
from uniecg_jax.models.unet import ConditionalUNet, UNetConfig

TEXT_DIM = 8


def test_beat_phase_is_zero_at_peaks_and_linear_between():
    peaks = [1.0, 2.0, 3.5]
    phase = rhythm.beat_phase(peaks, duration_s=5.0, num_points=50)   # cells of 0.1 s
    times = (np.arange(50) + 0.5) * 0.1
    # Between 1 and 2 s the RR is 1 s; between 2 and 3.5 s it is 1.5 s; outside, extended.
    expected = np.select([times < 1.0, times < 2.0, times < 3.5],
                         [(times - 0.0) / 1.0, times - 1.0, (times - 2.0) / 1.5],
                         ((times - 3.5) / 1.5) % 1.0)
    np.testing.assert_allclose(phase, expected, atol=1e-9)
    assert rhythm.beat_phase([2.0], 5.0, 10) is None
    np.testing.assert_array_equal(rhythm.rhythm_features(None, 5.0, 10), np.zeros((10, 2)))
    np.testing.assert_array_equal(rhythm.rhythm_features([2.0], 5.0, 10), np.zeros((10, 2)))


def test_requested_rhythm_has_the_rate_and_a_seeded_first_beat():
    features = rhythm.requested_rhythm([60.0, 150.0], 10.0, 1024, seed=3)
    assert features.shape == (2, 1024, 2) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, atol=1e-5)
    for row, rate in zip(features, (60.0, 150.0)):
        wraps = np.sum(np.diff(np.unwrap(np.arctan2(row[:, 0], row[:, 1])))) / (2 * np.pi)
        assert wraps * 6.0 == pytest.approx(rate, rel=0.02)   # beats in 10 s x 6 = bpm
    np.testing.assert_array_equal(features, rhythm.requested_rhythm([60.0, 150.0], 10.0, 1024, 3))
    assert not np.allclose(features, rhythm.requested_rhythm([60.0, 150.0], 10.0, 1024, 4))
    with pytest.raises(ValueError, match="positive"):
        rhythm.regular_beats(0.0, 10.0, 0.0)
    pooled = rhythm.pool_rhythm(features, 128)
    np.testing.assert_allclose(pooled, features.reshape(2, 128, 8, 2).mean(2))
    with pytest.raises(ValueError, match="not divisible"):
        rhythm.pool_rhythm(features, 100)


def _unet(rhythm_condition=True):
    cfg = UNetConfig(num_levels=3, latent_length=32, text_embed_dim=TEXT_DIM, base_channels=8,
                     rhythm_condition=rhythm_condition)
    model = ConditionalUNet(cfg)
    latent = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 4))
    steps, cond = jnp.array([10, 900]), jax.random.normal(jax.random.PRNGKey(2), (2, TEXT_DIM + 3))
    params = model.init(jax.random.PRNGKey(0), latent, steps, cond)
    return model, params, (latent, steps, cond)


def test_unet_reads_the_rhythm_and_drops_it_with_the_condition():
    model, params, (latent, steps, cond) = _unet()
    assert params["params"]["input_proj"]["kernel"].value.shape == (3, 4 + 2, 8)
    beats = jnp.asarray(rhythm.pool_rhythm(rhythm.requested_rhythm([60.0, 120.0], 10.0, 1024, 0),
                                           32))
    unknown = model.apply(params, latent, steps, cond)
    with_beats = model.apply(params, latent, steps, cond, None, beats)
    assert np.abs(np.asarray(with_beats - unknown)).max() > 1e-3
    np.testing.assert_allclose(unknown, model.apply(params, latent, steps, cond, None,
                                                    jnp.zeros_like(beats)), atol=1e-6)
    drop = jnp.array([True, False])
    dropped = model.apply(params, latent, steps, cond, drop, beats)
    null_unknown = model.apply(params, latent, steps, cond, drop)
    np.testing.assert_allclose(dropped[0], null_unknown[0], atol=1e-6)   # dropped: no rhythm
    np.testing.assert_allclose(dropped[1], with_beats[1], atol=1e-5)
    with pytest.raises(ValueError, match="rhythm"):
        model.apply(params, latent, steps, cond, None, beats[:, :16])


def test_rhythm_condition_needs_an_input_conv():
    with pytest.raises(ValueError, match="base_channels"):
        UNetConfig(rhythm_condition=True, base_channels=0)


def test_diffusion_examples_carry_the_measured_rhythm():
    from uniecg_jax.data import synthetic
    from uniecg_jax.data.examples import decode_example, encode_example, example_to_record
    from uniecg_jax.data.measure import detect_r_peaks, with_measured_rhythm
    from uniecg_jax.data.pipelines import DiffusionExample

    record = synthetic.generate(1, heart_rates=[90.0], seed=5)[0]
    measured = with_measured_rhythm(record)
    assert measured.r_peaks is not None and len(measured.r_peaks) >= 13
    round_trip = example_to_record(decode_example(encode_example(measured)))
    assert round_trip.r_peaks == measured.r_peaks
    assert example_to_record(decode_example(encode_example(record))).r_peaks is None

    example = decode_example(encode_example(record, np.ones(TEXT_DIM, np.float32)))
    plain = DiffusionExample().map(example)
    assert "rhythm" not in plain
    out = DiffusionExample(rhythm=True).map(example)   # no stored peaks: detected here
    assert out["rhythm"].shape == (1024, 2)
    # The phase restarts (cos = 1) at the R peaks of the 102.4 Hz signal the VAE reads.
    peaks = detect_r_peaks(out["signal"][1], 102.4)
    at_peaks = out["rhythm"][np.clip(np.round(peaks).astype(int), 0, 1023), 1]
    assert np.median(at_peaks) > 0.95


def test_roll_augmentation_keeps_each_ecg_and_its_beat_phase_aligned():
    from uniecg_jax.data.augment import roll_in_time

    # Spikes at the R peaks of two records; each record's phase restarts (cos = 1) at its spikes.
    peaks = [rhythm.regular_beats(rate, 10.0, 0.3) for rate in (60.0, 110.0)]
    phase = np.stack([rhythm.rhythm_features(p, 10.0, 1024) for p in peaks])
    ecg = np.zeros((2, 1024, 12), np.float32)
    for row, p in enumerate(peaks):
        ecg[row, np.round(p * 102.4 - 0.5).astype(int)] = 1.0
    rolled_ecg, rolled_phase = roll_in_time((jnp.asarray(ecg), jnp.asarray(phase)),
                                            jax.random.PRNGKey(3))
    rolled_ecg, rolled_phase = np.asarray(rolled_ecg), np.asarray(rolled_phase)
    for row in range(2):
        spikes = np.flatnonzero(rolled_ecg[row, :, 0])
        assert not np.array_equal(spikes, np.flatnonzero(ecg[row, :, 0]))   # it did move
        assert np.all(rolled_phase[row, spikes, 1] > 0.95)                  # still aligned
        assert np.all(rolled_ecg[row, :, 0] == rolled_ecg[row, :, 5])       # leads together
    with pytest.raises(ValueError, match="share"):
        roll_in_time((jnp.asarray(ecg), jnp.asarray(phase[:, :512])), jax.random.PRNGKey(0))
    # Stage 1's [B, leads, T] batches: the same rotation along the last axis.
    (leads_first,) = roll_in_time((jnp.asarray(ecg.transpose(0, 2, 1)),), jax.random.PRNGKey(3),
                                  axis=-1)
    np.testing.assert_array_equal(np.asarray(leads_first), rolled_ecg.transpose(0, 2, 1))
