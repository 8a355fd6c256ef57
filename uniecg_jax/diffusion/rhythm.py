"""Beat-timing features for rhythm-conditioned UNets (`model.unet.rhythm_condition`).

Why: a heart-rate scalar tells a denoiser how far apart beats should be, but not where they are. At
high noise the best estimate of the clean latent averages over every beat phase, so a rate-only
condition barely changes the denoising target, and a small model trained on little data learns to
ignore it (DiffuSETS's design; see issue 5's notes). Giving the UNet the beat phase at every latent
position turns "beats every 60/HR seconds" into a local pattern a convolution follows directly.

The feature is `(sin 2*pi*phi, cos 2*pi*phi)`, phi in [0, 1) the fraction of the current RR interval
elapsed (0 at an R peak), sampled at the centres of `num_points` equal cells of the record:

    features = rhythm_features(r_peaks_s, duration_s=10.0, num_points=1024)    # [1024, 2]
    latent_rhythm = pool_rhythm(features[None], 128)                            # [1, 128, 2]

Training reads R peaks detected in each record (QRS detection, `data.measure`); generation places
regular beats at the requested rate with a seeded random first beat (`regular_beats`). Zeros mean
"rhythm unknown", which is also what the null condition of classifier-free guidance sees.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from uniecg_jax.models.unet import RHYTHM_CHANNELS


def beat_phase(r_peaks_s: Sequence[float], duration_s: float, num_points: int) -> np.ndarray | None:
    """Phase in [0, 1) at `num_points` cell centres of a `duration_s` record, or None when fewer
    than 2 R peaks are known. Before the first and after the last peak the neighbouring RR interval
    is extended."""
    peaks = np.unique(np.asarray(r_peaks_s, np.float64))   # sorted, duplicates dropped
    if len(peaks) < 2:
        return None
    rr = np.diff(peaks)
    times = (np.arange(num_points) + 0.5) * (duration_s / num_points)
    # Extend the beat grid by whole RR intervals past both ends so every time has a bracket.
    before = peaks[0] - rr[0] * np.arange(int(np.ceil(peaks[0] / rr[0])) + 1, 0, -1)
    after = peaks[-1] + rr[-1] * np.arange(1, int(np.ceil((duration_s - peaks[-1]) / rr[-1])) + 2)
    grid = np.concatenate([before, peaks, after])
    index = np.clip(np.searchsorted(grid, times, side="right") - 1, 0, len(grid) - 2)
    phase = (times - grid[index]) / (grid[index + 1] - grid[index])
    return np.clip(phase, 0.0, np.nextafter(1.0, 0.0))


def rhythm_features(r_peaks_s: Sequence[float] | None, duration_s: float, num_points: int
                    ) -> np.ndarray:
    """`[num_points, 2]` float32 (sin, cos) of the beat phase; zeros when the rhythm is unknown."""
    phase = None if r_peaks_s is None else beat_phase(r_peaks_s, duration_s, num_points)
    if phase is None:
        return np.zeros((num_points, RHYTHM_CHANNELS), np.float32)
    angle = 2.0 * np.pi * phase
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).astype(np.float32)


def regular_beats(heart_rate: float, duration_s: float, first_beat_s: float) -> np.ndarray:
    """R peaks (s) at a constant `heart_rate` bpm from `first_beat_s` to the end of the record."""
    if not np.isfinite(heart_rate) or heart_rate <= 0:
        raise ValueError(f"heart rate must be a positive number of bpm, got {heart_rate}")
    return np.arange(first_beat_s, duration_s, 60.0 / heart_rate)


def requested_rhythm(heart_rates: Sequence[float], duration_s: float, num_points: int,
                     seed: int) -> np.ndarray:
    """`[N, num_points, 2]` features of regular beats at each requested rate, the first beat drawn
    uniformly within the first RR interval (from `seed`, one draw per row)."""
    rng = np.random.default_rng(seed)
    rates = np.asarray(heart_rates, np.float64).reshape(-1)
    return np.stack([rhythm_features(regular_beats(rate, duration_s,
                                                   rng.uniform(0.0, 60.0 / rate)),
                                     duration_s, num_points) for rate in rates])


def pool_rhythm(features, latent_length: int):
    """`[B, T, 2]` -> `[B, latent_length, 2]` by averaging equal cells (T divisible by it); works on
    NumPy and JAX arrays."""
    batch, length, channels = features.shape
    if length % latent_length:
        raise ValueError(f"rhythm length {length} is not divisible by the latent length "
                         f"{latent_length}")
    return features.reshape(batch, latent_length, length // latent_length, channels).mean(axis=2)
