"""Synthetic 12-lead ECGs with known ground truth (neurokit2 `ecg_simulate(method="multileads")`)
and a matching text report, for unlimited demo/test data."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from uniecg_jax.data.record import ENCODER_FS, LEADS, RECORD_SECONDS, ECGRecord, make_record


def rhythm_label(heart_rate: float) -> str:
    """Sinus rhythm name for a rate: bradycardia < 60 bpm, tachycardia > 100 bpm."""
    if heart_rate < 60:
        return "sinus bradycardia"
    if heart_rate > 100:
        return "sinus tachycardia"
    return "sinus rhythm"


def synthetic_report(heart_rate: float) -> str:
    """E.g. "sinus rhythm. heart rate 72 bpm. normal ecg." (what the generator's signal shows)."""
    label = rhythm_label(heart_rate)
    verdict = "normal ecg" if label == "sinus rhythm" else "otherwise normal ecg"
    return f"{label}. heart rate {int(round(heart_rate))} bpm. {verdict}."


def generate_one(heart_rate: float, *, seed: int, record_id: str, fs: float = ENCODER_FS,
                 duration_s: float = RECORD_SECONDS, noise: float = 0.01, age: float | None = None,
                 sex: str | None = None) -> ECGRecord:
    """One [12, duration_s * fs] synthetic record at `heart_rate` bpm (deterministic in seed)."""
    import neurokit2 as nk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = nk.ecg_simulate(duration=duration_s, sampling_rate=int(fs), heart_rate=heart_rate,
                                noise=noise, method="multileads", random_state=seed)
    signal = frame[list(LEADS)].to_numpy(dtype=np.float32).T
    report = synthetic_report(heart_rate)
    return make_record(signal, list(LEADS), fs, path=f"<synthetic {record_id}>",
                       record_id=record_id, patient_id=record_id, age=age, sex=sex,
                       heart_rate=float(heart_rate), report=report,
                       labels=(rhythm_label(heart_rate),))


def generate(n: int, heart_rates: Sequence[float] | None = None, seed: int = 0,
             fs: float = ENCODER_FS) -> list[ECGRecord]:
    """`n` synthetic 10 s records. heart_rates: one per record (default: uniform 45-125 bpm drawn
    from `seed`). Age and sex are drawn from `seed` too. Record ids are `synthetic_{seed}_{i}`."""
    rng = np.random.default_rng(seed)
    if heart_rates is None:
        heart_rates = rng.uniform(45, 125, size=n).round(1)
    if len(heart_rates) != n:
        raise ValueError(f"heart_rates has {len(heart_rates)} values for n={n} records")
    ages = rng.integers(20, 90, size=n)
    sexes = rng.choice(["M", "F"], size=n)
    return [generate_one(float(hr), seed=seed * 100003 + i, record_id=f"synthetic_{seed}_{i}",
                         fs=fs, age=float(ages[i]), sex=str(sexes[i]))
            for i, hr in enumerate(heart_rates)]
