"""Judge-free fidelity metrics for generated ECGs (DiffuSETS-style).

* heart-rate MAE against the requested rates, the rate measured by `data.measure.heart_rate_bpm`:
  the very rule that measured the training records' rates the model was conditioned on (Kalidas
  2017 on the cleaned lead II, upsampled from 102.4 Hz, median RR; `method="xqrs"` for wfdb XQRS);
* QRS-detection precision/recall/F1 against reference beat times (tolerance window);
* per-lead amplitude statistics, generated vs real.
CLIP score / FID need the ECG-text CLIP (later work).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from uniecg_jax.data.measure import heart_rate_bpm


def heart_rate_mae(ecgs: np.ndarray, sample_rate: float, requested: Sequence[float] | float,
                   method: str = "kalidas2017") -> dict:
    """MAE (bpm) between detected and requested rates over `[N, 12, T]` ECGs; ECGs with no
    detectable rhythm are counted in `undetected` and left out of the mean."""
    ecgs = np.asarray(ecgs)
    rates = np.array([heart_rate_bpm(e, sample_rate, method=method) for e in ecgs])
    return rate_errors(rates, requested)


def rate_errors(rates: Sequence[float], requested: Sequence[float] | float) -> dict:
    """`heart_rate_mae` from already detected rates `[N]` (NaN = undetected)."""
    rates = np.asarray(rates, dtype=np.float64)
    requested = np.broadcast_to(np.asarray(requested, dtype=np.float64), (len(rates),))
    valid = np.isfinite(rates)
    mae = float(np.mean(np.abs(rates[valid] - requested[valid]))) if valid.any() else float("nan")
    return {"hr_mae": mae, "detected_hr": rates.tolist(), "undetected": int((~valid).sum())}


def qrs_f1(detected: np.ndarray, reference: np.ndarray, tolerance: float = 0.15) -> dict:
    """Precision/recall/F1 of beat times (s): each reference beat matches at most one detection
    within `tolerance` seconds (greedy in time order)."""
    detected, reference = np.sort(np.asarray(detected)), np.sort(np.asarray(reference))
    used = np.zeros(len(detected), bool)
    hits = 0
    for beat in reference:
        candidates = np.where(~used & (np.abs(detected - beat) <= tolerance))[0]
        if len(candidates):
            used[candidates[np.argmin(np.abs(detected[candidates] - beat))]] = True
            hits += 1
    precision = hits / len(detected) if len(detected) else 0.0
    recall = hits / len(reference) if len(reference) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def amplitude_moments(ecgs: np.ndarray) -> dict:
    """Mergeable per-lead amplitude moments of `[N, 12, T]` ECGs: sample count, mean, sum of
    squared deviations (m2), and the sum and count of per-ECG peak-to-peak values."""
    ecgs = np.asarray(ecgs, dtype=np.float64)
    mean = ecgs.mean(axis=(0, 2))
    return {"count": int(ecgs.shape[0] * ecgs.shape[2]), "mean": mean.tolist(),
            "m2": ((ecgs - mean[None, :, None]) ** 2).sum(axis=(0, 2)).tolist(),
            "ptp_sum": np.ptp(ecgs, axis=2).sum(axis=0).tolist(), "num_ecgs": int(ecgs.shape[0])}


def combine_amplitude_moments(parts: Sequence[dict]) -> dict:
    """The moments of the union of the parts' ECGs (Chan et al.'s pairwise update)."""
    count, mean, m2 = 0, np.zeros(0), np.zeros(0)
    ptp_sum, num_ecgs = 0.0, 0
    for part in parts:
        other_mean, other_m2 = np.asarray(part["mean"]), np.asarray(part["m2"])
        if count == 0:
            count, mean, m2 = part["count"], other_mean, other_m2
        else:
            total = count + part["count"]
            delta = other_mean - mean
            mean = mean + delta * part["count"] / total
            m2 = m2 + other_m2 + delta ** 2 * count * part["count"] / total
            count = total
        ptp_sum = ptp_sum + np.asarray(part["ptp_sum"])
        num_ecgs += part["num_ecgs"]
    return {"count": count, "mean": np.asarray(mean).tolist(), "m2": np.asarray(m2).tolist(),
            "ptp_sum": np.asarray(ptp_sum).tolist(), "num_ecgs": num_ecgs}


def stats_from_moments(moments: dict) -> dict:
    """Per-lead mean, standard deviation and mean peak-to-peak (mV) from `amplitude_moments`."""
    return {"mean": np.asarray(moments["mean"]),
            "std": np.sqrt(np.asarray(moments["m2"]) / moments["count"]),
            "peak_to_peak": np.asarray(moments["ptp_sum"]) / moments["num_ecgs"]}


def amplitude_stats(ecgs: np.ndarray) -> dict:
    """Per-lead (12) mean, standard deviation and mean peak-to-peak (mV) over `[N, 12, T]`."""
    return stats_from_moments(amplitude_moments(ecgs))


def compare_amplitudes(generated: np.ndarray, real: np.ndarray) -> dict:
    """Per-lead generated/real ratios of std and peak-to-peak, and their mean absolute log ratio
    (0 = identical amplitude profile)."""
    return compare_amplitude_stats(amplitude_stats(generated), amplitude_stats(real))


def compare_amplitude_stats(gen: dict, ref: dict) -> dict:
    """`compare_amplitudes` from `amplitude_stats` / `stats_from_moments` of both sets."""
    std_ratio = gen["std"] / np.maximum(ref["std"], 1e-12)
    ptp_ratio = gen["peak_to_peak"] / np.maximum(ref["peak_to_peak"], 1e-12)
    return {"std_ratio": std_ratio.tolist(), "ptp_ratio": ptp_ratio.tolist(),
            "mean_abs_log_std_ratio": float(np.mean(np.abs(np.log(np.maximum(std_ratio, 1e-12))))),
            "mean_abs_log_ptp_ratio": float(np.mean(np.abs(np.log(np.maximum(ptp_ratio, 1e-12)))))}
