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
    requested = np.broadcast_to(np.asarray(requested, dtype=np.float64), (len(ecgs),))
    rates = np.array([heart_rate_bpm(e, sample_rate, method=method) for e in ecgs])
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


def amplitude_stats(ecgs: np.ndarray) -> dict:
    """Per-lead (12) mean, standard deviation and mean peak-to-peak (mV) over `[N, 12, T]`."""
    ecgs = np.asarray(ecgs, dtype=np.float64)
    return {"mean": ecgs.mean(axis=(0, 2)), "std": ecgs.std(axis=(0, 2)),
            "peak_to_peak": np.ptp(ecgs, axis=2).mean(axis=0)}


def compare_amplitudes(generated: np.ndarray, real: np.ndarray) -> dict:
    """Per-lead generated/real ratios of std and peak-to-peak, and their mean absolute log ratio
    (0 = identical amplitude profile)."""
    gen, ref = amplitude_stats(generated), amplitude_stats(real)
    std_ratio = gen["std"] / np.maximum(ref["std"], 1e-12)
    ptp_ratio = gen["peak_to_peak"] / np.maximum(ref["peak_to_peak"], 1e-12)
    return {"std_ratio": std_ratio.tolist(), "ptp_ratio": ptp_ratio.tolist(),
            "mean_abs_log_std_ratio": float(np.mean(np.abs(np.log(np.maximum(std_ratio, 1e-12))))),
            "mean_abs_log_ptp_ratio": float(np.mean(np.abs(np.log(np.maximum(ptp_ratio, 1e-12)))))}
