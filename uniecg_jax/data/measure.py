"""Measurements computed from a signal (QRS detection), used for conversations, tests and metrics."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np


@dataclasses.dataclass(frozen=True)
class RhythmMeasurements:
    """R peaks of one lead and what follows from them (NaN when fewer than 2 beats)."""

    r_peaks: np.ndarray        # [K] sample positions
    heart_rate_bpm: float
    mean_rr_ms: float
    rr_std_ms: float


# The detector's filters are tuned for diagnostic rates; at DiffuSETS' 102.4 Hz it mistakes T waves
# for R peaks, so low-rate signals are upsampled to this rate before detection.
DETECTION_FS = 500.0


def detect_r_peaks(lead: np.ndarray, fs: float) -> np.ndarray:
    """[T] one lead in mV sampled at fs Hz -> [K] R-peak positions in samples of that rate
    (neurokit2 Kalidas 2017 detector; fractional when fs < 250 Hz, as peaks are found after
    upsampling to 500 Hz)."""
    import neurokit2 as nk

    if fs < 250:
        from uniecg_jax.data.record import resample

        upsampled = resample(np.asarray(lead, dtype=np.float32)[None], fs, DETECTION_FS)[0]
        return detect_r_peaks(upsampled, DETECTION_FS) * (fs / DETECTION_FS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleaned = nk.ecg_clean(np.asarray(lead, dtype=np.float64), sampling_rate=int(round(fs)))
        _, info = nk.ecg_peaks(cleaned, sampling_rate=int(round(fs)), method="kalidas2017")
    return np.asarray(info["ECG_R_Peaks"], dtype=np.float64)


def rhythm(lead: np.ndarray, fs: float) -> RhythmMeasurements:
    """Heart rate (60000 / median RR), mean and SD of RR intervals of a [T] lead sampled at fs Hz."""
    peaks = detect_r_peaks(lead, fs)
    if len(peaks) < 2:
        return RhythmMeasurements(peaks, float("nan"), float("nan"), float("nan"))
    rr_ms = np.diff(peaks) / fs * 1000.0
    return RhythmMeasurements(peaks, float(60000.0 / np.median(rr_ms)), float(rr_ms.mean()),
                              float(rr_ms.std()))


def heart_rate_bpm(signal: np.ndarray, fs: float, lead_index: int = 1) -> float:
    """Heart rate of a [12, T] signal measured on lead II (index 1) by QRS detection."""
    return rhythm(signal[lead_index], fs).heart_rate_bpm


def with_measured_rhythm(record, lead_index: int = 1):
    """`record` with `r_peaks` (seconds, QRS detection on lead II) and, when unknown, `heart_rate`
    filled in; unchanged when both are known. Detection runs once here so data pipelines need none."""
    if record.r_peaks is not None and record.heart_rate is not None:
        return record
    measured = rhythm(record.signal[lead_index], record.fs)
    heart_rate = record.heart_rate
    if heart_rate is None and np.isfinite(measured.heart_rate_bpm):
        heart_rate = float(measured.heart_rate_bpm)
    return dataclasses.replace(record, heart_rate=heart_rate,
                               r_peaks=tuple(float(t) for t in measured.r_peaks / record.fs))
