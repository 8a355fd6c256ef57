"""Fidelity metrics: heart rate by QRS detection at 102.4 Hz (`data.measure`), QRS F1, amplitude
statistics."""
import numpy as np
import pytest
import wfdb

from uniecg_jax.data import measure
from uniecg_jax.data.record import resample
from uniecg_jax.eval import ecg_fidelity as fid

SAMPLES = "/work/shared/data/ecg_samples/cinc2021"


def synthetic_ecg(bpm: float, seconds: float = 10.0, rate: float = 102.4) -> np.ndarray:
    """12 leads of narrow Gaussian R waves (1 mV) at a fixed rate plus small T waves, `[12, T]`."""
    time = np.arange(int(seconds * rate)) / rate
    beats = np.arange(0.3, seconds, 60.0 / bpm)
    signal = sum(np.exp(-0.5 * ((time - b) / 0.012) ** 2) +
                 0.2 * np.exp(-0.5 * ((time - b - 0.25) / 0.05) ** 2) for b in beats)
    return np.stack([signal * (0.5 + 0.05 * k) for k in range(12)])


@pytest.mark.parametrize("bpm", [50, 75, 120])
def test_heart_rate_of_synthetic_ecg(bpm):
    ecg = synthetic_ecg(bpm)
    assert measure.heart_rate_bpm(ecg, 102.4) == pytest.approx(bpm, abs=2.0)
    result = fid.heart_rate_mae(np.stack([ecg, ecg, np.zeros_like(ecg)]), 102.4,
                                [bpm + 10, bpm - 10, bpm])
    assert result["hr_mae"] == pytest.approx(10.0, abs=2.0) and result["undetected"] == 1
    assert np.isnan(measure.heart_rate_bpm(np.zeros((12, 1024)), 102.4))


def test_heart_rate_falls_back_to_the_next_lead_with_beats():
    ecg = synthetic_ecg(90)
    ecg[1] = 0.0                                         # lead II flat: lead III gives the rate
    measured = measure.ecg_rhythm(ecg, 102.4)
    assert measured.lead_index == 2 and measured.heart_rate_bpm == pytest.approx(90, abs=2.0)
    ecg[2:] = 0.0                                        # only lead I left: wraps around to it
    assert measure.ecg_rhythm(ecg, 102.4).lead_index == 0


def test_real_record_rate_survives_downsampling_and_f1():
    record = wfdb.rdrecord(f"{SAMPLES}/E07500")
    ecg = np.nan_to_num(record.p_signal.T[:, :5000])
    at_500 = measure.detect_r_peaks(ecg[1], 500.0) / 500.0
    low = resample(ecg, 500.0, 102.4)
    at_102 = measure.detect_r_peaks(low[1], 102.4) / 102.4
    assert len(at_500) >= 5
    scores = fid.qrs_f1(at_102, at_500, tolerance=0.1)
    assert scores["f1"] > 0.9


def test_heart_rate_at_102_hz_matches_500_hz_on_real_records():
    differences = []
    for index in range(7500, 7510):
        ecg = np.nan_to_num(wfdb.rdrecord(f"{SAMPLES}/E{index:05d}").p_signal.T[:, :5000])
        differences.append(measure.heart_rate_bpm(resample(ecg, 500.0, 102.4), 102.4)
                           - measure.heart_rate_bpm(ecg, 500.0))
    assert np.median(np.abs(differences)) < 2.0


def test_qrs_f1_counts():
    scores = fid.qrs_f1(np.array([1.0, 2.02, 3.5]), np.array([1.0, 2.0, 3.0, 4.0]), tolerance=0.1)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_amplitude_stats():
    real = synthetic_ecg(70)[None]
    stats = fid.compare_amplitudes(real * 2.0, real)
    np.testing.assert_allclose(stats["ptp_ratio"], 2.0, rtol=1e-9)
    assert stats["mean_abs_log_std_ratio"] == pytest.approx(np.log(2.0))
    assert fid.compare_amplitudes(real, real)["mean_abs_log_ptp_ratio"] == 0.0
