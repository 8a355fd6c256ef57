"""Rhythm measured from a signal by QRS detection: the one rule behind the heart rate that conditions
the diffusion model (`with_measured_rhythm`), the findings of conversations and the heart-rate
metrics that score generated ECGs (`eval.ecg_fidelity`).

The rule: R peaks of lead II (index 1) by neurokit2's Kalidas 2017 detector on the cleaned
(`nk.ecg_clean`) signal, upsampled to 500 Hz when the rate is below 250 Hz; when lead II has fewer
than two beats, the next lead that has two or more gives them (II, III, ..., V6, I); heart rate is
60000 / median RR (ms). The median, not the mean, because one missed or extra beat in 10 s moves the
mean RR by about 10 % and the median hardly. `method="xqrs"` swaps the detector for wfdb's XQRS
(an independent detector; same upsampling, same lead rule, same median).

Why one rule: conditioning measured with cleaning and the median while the metric measured without
cleaning and with the mean; on demo ECGs generated for 120 bpm the first read 113-120 bpm, the second
86-101, and `wfdb.processing.xqrs_detect` agreed with the first. `tests/test_data_records.py` checks
both paths against neurokit2-simulated ECGs at known rates and against XQRS.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np

from uniecg_jax.data.record import resample

QRS_METHODS = ("kalidas2017", "xqrs")
LEAD_II = 1


@dataclasses.dataclass(frozen=True)
class RhythmMeasurements:
    """R peaks of one lead and what follows from them (NaN when fewer than 2 beats)."""

    r_peaks: np.ndarray        # [K] sample positions
    heart_rate_bpm: float
    mean_rr_ms: float
    rr_std_ms: float
    lead_index: int = LEAD_II  # the lead the peaks were found on


# The detectors' filters are tuned for diagnostic rates; at DiffuSETS' 102.4 Hz Kalidas' wavelet band
# (31-62 Hz at 500 Hz) is half empty and XQRS counts T waves as beats (E07500: 106 bpm at 102.4 Hz,
# 57 at 500 Hz), so signals below MIN_DETECTION_FS are upsampled to DETECTION_FS first.
MIN_DETECTION_FS, DETECTION_FS = 250.0, 500.0
# XQRS learns its thresholds from the first beats, starting from 0.13 (tuned to MIT-BIH amplitudes);
# the band-passed energy of smooth ECGs (neurokit2-simulated, generated) stays below that, learning
# finds no beat and nothing is detected. Starting lower lets it learn; it adapts from there.
XQRS_INITIAL_THRESHOLD = 0.01

# The normal sinus rate range (bpm): below is bradycardia, above tachycardia. One home for the
# synthetic reports' rhythm names and the grounded answers' rate verdicts.
BRADYCARDIA_BELOW_BPM = 60
TACHYCARDIA_ABOVE_BPM = 100


def detect_r_peaks(lead: np.ndarray, fs: float, method: str = "kalidas2017") -> np.ndarray:
    """[T] one lead in mV sampled at fs Hz -> [K] R-peak positions in samples of that rate
    (fractional when fs < 250 Hz, as peaks are then found after upsampling to 500 Hz).

    kalidas2017: neurokit2's Kalidas 2017 detector on the cleaned signal (`nk.ecg_clean`).
    xqrs: wfdb's XQRS (its own band-pass filter). Non-finite samples count as 0; a signal with no
    detectable beat gives an empty array.
    """
    if method not in QRS_METHODS:
        raise ValueError(f"QRS method must be one of {QRS_METHODS}, got {method!r}")
    lead = np.nan_to_num(np.asarray(lead, dtype=np.float64))
    if fs < MIN_DETECTION_FS:
        upsampled = resample(lead[None], fs, DETECTION_FS)[0]
        return detect_r_peaks(upsampled, DETECTION_FS, method) * (fs / DETECTION_FS)
    if method == "xqrs":
        from wfdb import processing  # optional heavy dependency, only for this detector

        conf = processing.XQRS.Conf(qrs_thr_init=XQRS_INITIAL_THRESHOLD)
        return np.asarray(processing.xqrs_detect(lead, fs=fs, verbose=False, conf=conf),
                          dtype=np.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return kalidas_r_peaks(lead, int(round(fs)))
    except Exception:  # neurokit2 raises assorted errors on degenerate (e.g. generated) signals
        return np.zeros(0)


@functools.lru_cache(maxsize=32)
def _butter_sos(order: int, cutoff: float | tuple[float, float], btype: str,
                fs: float | None) -> np.ndarray:
    # One design per (order, cutoff, rate): neurokit2 redesigns both filters on every call (~1.3 ms
    # per record). The filters only read it (and their Cython needs a writable buffer).
    import scipy.signal  # 0.5-3 s to import; this module is on every command's path (as record.py)

    return scipy.signal.butter(order, list(cutoff) if isinstance(cutoff, tuple) else cutoff,
                               btype=btype, output="sos", fs=fs)


def kalidas_r_peaks(lead: np.ndarray, fs: int) -> np.ndarray:
    """`nk.ecg_peaks(nk.ecg_clean(lead, fs), fs, method="kalidas2017")["ECG_R_Peaks"]` of a finite
    float64 [T] lead, as float64 sample positions, with the same scipy / pywt calls in the same
    order (so the same peaks to the last bit; `tests/test_data_records.py` compares them) but the
    two Butterworth designs cached and without neurokit2's pandas bookkeeping.

    Follows neurokit2 0.2.13: `ecg/ecg_clean.py::_ecg_clean_nk` (0.5 Hz order-5 high-pass
    `sosfiltfilt`, then the 50 Hz moving-average `filtfilt` of `signal/signal_filter.py`) and
    `ecg/ecg_findpeaks.py::_ecg_findpeaks_kalidas` (db3 SWT level 3, squared detail, order-3
    0.01-10 Hz band-pass `sosfilt`, then neurokit2's own Pan-Tompkins thresholding).
    """
    import pywt  # neurokit2's dependency; with it, only for this detector
    import scipy.signal  # see `_butter_sos`
    from neurokit2.ecg.ecg_findpeaks import _ecg_findpeaks_peakdetect  # optional heavy dependency

    cleaned = scipy.signal.sosfiltfilt(_butter_sos(5, 0.5, "highpass", fs), lead)
    window = np.ones(int(fs / 50) if fs >= 100 else 2)
    cleaned = scipy.signal.filtfilt(window, [len(window)], cleaned, method="pad")
    length = len(cleaned)
    swt_level = 3
    padding = (-length) % 2 ** swt_level
    padded = np.pad(cleaned, (0, padding), "edge") if padding else cleaned
    detail = np.array(pywt.swt(padded, "db3", level=swt_level))[0, 1, :]
    band = _butter_sos(3, (0.01 / (0.5 * fs), 10 / (0.5 * fs)), "bandpass", None)
    energy = scipy.signal.sosfilt(band, detail * detail)[:length]
    return np.array(_ecg_findpeaks_peakdetect(energy, fs), dtype="int").astype(np.float64)


def rhythm(lead: np.ndarray, fs: float, method: str = "kalidas2017") -> RhythmMeasurements:
    """Heart rate (60000 / median RR), mean and SD of RR intervals of a [T] lead sampled at fs Hz."""
    peaks = detect_r_peaks(lead, fs, method)
    if len(peaks) < 2:
        return RhythmMeasurements(peaks, float("nan"), float("nan"), float("nan"))
    rr_ms = np.diff(peaks) / fs * 1000.0
    return RhythmMeasurements(peaks, float(60000.0 / np.median(rr_ms)), float(rr_ms.mean()),
                              float(rr_ms.std()))


def ecg_rhythm(signal: np.ndarray, fs: float, lead_index: int = LEAD_II,
               method: str = "kalidas2017") -> RhythmMeasurements:
    """`rhythm` of a [12, T] signal: of lead `lead_index` (II), or of the first lead after it (in
    order, wrapping) with two or more beats when it has fewer; NaN rates when no lead has."""
    signal = np.asarray(signal)
    first = None
    for index in list(range(lead_index, signal.shape[0])) + list(range(lead_index)):
        measured = dataclasses.replace(rhythm(signal[index], fs, method), lead_index=index)
        if len(measured.r_peaks) >= 2:
            return measured
        if first is None:
            first = measured
    return first


def heart_rate_bpm(signal: np.ndarray, fs: float, lead_index: int = LEAD_II,
                   method: str = "kalidas2017") -> float:
    """Heart rate (bpm) of a [12, T] signal by `ecg_rhythm`; NaN when no lead has two beats."""
    return ecg_rhythm(signal, fs, lead_index, method).heart_rate_bpm


def with_measured_rhythm(record, lead_index: int = LEAD_II):
    """`record` with `r_peaks` (seconds, by `ecg_rhythm`) and, when unknown, `heart_rate` filled
    in; unchanged when both are known. Detection runs once here so data pipelines need none."""
    if record.r_peaks is not None and record.heart_rate is not None:
        return record
    measured = ecg_rhythm(record.signal, record.fs, lead_index)
    heart_rate = record.heart_rate
    if heart_rate is None and np.isfinite(measured.heart_rate_bpm):
        heart_rate = float(measured.heart_rate_bpm)
    return dataclasses.replace(record, heart_rate=heart_rate,
                               r_peaks=tuple(float(t) for t in measured.r_peaks / record.fs))


def with_measured_rhythms(records) -> list:
    """`with_measured_rhythm` of each record (measured once, before training or evaluation)."""
    return [with_measured_rhythm(record) for record in records]
