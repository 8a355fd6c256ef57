"""Synthetic 12-lead ECGs with known ground truth (neurokit2 `ecg_simulate(method="multileads")`)
and a matching text report, for unlimited demo/test data."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import warnings
from typing import Sequence

import numpy as np
from tqdm import tqdm

from uniecg_jax.caches import cache_home
from uniecg_jax.data.measure import BRADYCARDIA_BELOW_BPM, TACHYCARDIA_ABOVE_BPM, ecg_rhythm
from uniecg_jax.data.record import ENCODER_FS, LEADS, RECORD_SECONDS, ECGRecord, make_record, \
    pad_or_crop, resample

# The synthetic heart rates (bpm): uniform over this range, so that "always say the mean rate" does
# not pay; brady- and tachycardia both occur.
SYNTHETIC_RATES_BPM = (45.0, 125.0)


def rhythm_label(heart_rate: float) -> str:
    """Sinus rhythm name for a rate: bradycardia < 60 bpm, tachycardia > 100 bpm."""
    if heart_rate < BRADYCARDIA_BELOW_BPM:
        return "sinus bradycardia"
    if heart_rate > TACHYCARDIA_ABOVE_BPM:
        return "sinus tachycardia"
    return "sinus rhythm"


def synthetic_report(heart_rate: float) -> str:
    """E.g. "sinus rhythm. heart rate 72 bpm. normal ecg." (what the generator's signal shows)."""
    label = rhythm_label(heart_rate)
    verdict = "normal ecg" if label == "sinus rhythm" else "otherwise normal ecg"
    return f"{label}. heart rate {int(round(heart_rate))} bpm. {verdict}."


def synthetic_labels(heart_rate: float) -> tuple[str, ...]:
    """Every diagnosis statement `synthetic_report` asserts, so that the report (what stage 1 is
    trained to say) and the labels (what it is scored against) agree: the rhythm, plus "normal
    ECG" in the 60-100 bpm range. "Otherwise normal ECG" (brady-/tachycardia) is not the normal-ECG
    statement: it says the ECG is abnormal in what precedes it."""
    label = rhythm_label(heart_rate)
    return (label, "normal ECG") if label == "sinus rhythm" else (label,)


def generate_one(heart_rate: float, *, seed: int, record_id: str, fs: float = ENCODER_FS,
                 duration_s: float = RECORD_SECONDS, noise: float = 0.01, age: float | None = None,
                 sex: str | None = None) -> ECGRecord:
    """One [12, duration_s * fs] synthetic record at `heart_rate` bpm (deterministic in seed)."""
    import neurokit2 as nk  # slow import (~1-2 s), only when an ECG is actually simulated

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = nk.ecg_simulate(duration=duration_s, sampling_rate=int(fs), heart_rate=heart_rate,
                                noise=noise, method="multileads", random_state=seed)
    signal = frame[list(LEADS)].to_numpy(dtype=np.float32).T
    report = synthetic_report(heart_rate)
    return make_record(signal, list(LEADS), fs, path=f"<synthetic {record_id}>",
                       record_id=record_id, patient_id=record_id, age=age, sex=sex,
                       heart_rate=float(heart_rate), report=report,
                       labels=synthetic_labels(heart_rate))


def generate(n: int, heart_rates: Sequence[float] | None = None, seed: int = 0,
             fs: float = ENCODER_FS, progress: bool = True) -> list[ECGRecord]:
    """`n` synthetic 10 s records. heart_rates: one per record (default: uniform over
    `SYNTHETIC_RATES_BPM` drawn from `seed`). Age and sex are drawn from `seed` too. Record ids are `synthetic_{seed}_{i}`.
    progress: a tqdm bar on stderr while synthesising (more than one record)."""
    rng = np.random.default_rng(seed)
    if heart_rates is None:
        heart_rates = rng.uniform(*SYNTHETIC_RATES_BPM, size=n).round(1)
    if len(heart_rates) != n:
        raise ValueError(f"heart_rates has {len(heart_rates)} values for n={n} records")
    ages = rng.integers(20, 90, size=n)
    sexes = rng.choice(["M", "F"], size=n)
    # neurokit2 takes ~1-2 s a record: a bar, so that a demo synthesising 96 of them is not silent.
    return [generate_one(float(hr), seed=seed * 100003 + i, record_id=f"synthetic_{seed}_{i}",
                         fs=fs, age=float(ages[i]), sex=str(sexes[i]))
            for i, hr in enumerate(tqdm(heart_rates, desc="synthesising ECGs (neurokit2)",
                                        unit="ECG", disable=n < 2 or not progress))]


def default_cache_dir() -> str:
    """$UNIECG_CACHE, else ~/.cache/uniecg_jax (`caches.cache_home()`)."""
    return str(cache_home())


def cached_synthetic(count: int, seed: int, heart_rates: Sequence[float] | None = None,
                     cache_dir: str | None = None) -> list[ECGRecord]:
    """`generate(count, rates, seed)`, pickled once in `cache_dir` (default `default_cache_dir()`),
    as neurokit2 takes ~2 s per record. heart_rates: cycled over the `count` records, or None for
    `generate`'s uniform 45-125 bpm draw. The file name is keyed by count, seed and rates; a
    corrupt, truncated or stale file is regenerated."""
    if count <= 0:
        return []
    rates = None if heart_rates is None else [float(heart_rates[i % len(heart_rates)])
                                              for i in range(count)]
    directory = cache_dir or default_cache_dir()
    key = hashlib.sha1(json.dumps([count, rates, seed]).encode()).hexdigest()[:12]
    path = os.path.join(directory, f"synthetic_n{count}_seed{seed}_{key}.pkl")
    try:
        with open(path, "rb") as f:
            records = pickle.load(f)
        if len(records) == count:
            # Labels are a function of the rate: files written before `synthetic_labels` got
            # "normal ECG" are relabelled here instead of re-simulated (minutes of neurokit2).
            return [dataclasses.replace(r, labels=synthetic_labels(r.heart_rate))
                    for r in records]
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError):
        pass
    records = generate(count, heart_rates=rates, seed=seed)
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        pickle.dump(records, f)
    os.replace(path + ".tmp", path)
    return records


def time_stretch(signal: np.ndarray, fs: float, factor: float, r_peaks: np.ndarray) -> np.ndarray:
    """[C, T] signal played `factor` times faster (factor 1.5: 60 -> 90 bpm) -> [C, T], still at
    `fs`. Faster needs more than T samples of source: the beats between the first and the last R
    peak (`r_peaks`, samples) are repeated after the last one, so the joins fall on R peaks, where
    the beat sequence continues as it would, instead of on a cut through a beat (a wrap-around)."""
    length = signal.shape[-1]
    first, last = int(r_peaks[0]), int(r_peaks[-1])
    needed = int(np.ceil(length * factor)) + 1
    repeats = max(0, int(np.ceil((needed - last) / max(last - first, 1))))
    extended = np.concatenate([signal[:, :last]] + [signal[:, first:last]] * repeats
                              + [signal[:, last:]] * (repeats == 0), axis=-1)
    # Played faster = sampled at fs / factor and read back at fs (the package's one resampler).
    return pad_or_crop(resample(extended, fs, fs / factor), length)


def stretched_to_rate(record: ECGRecord, rate_bpm: float, record_id: str) -> ECGRecord | None:
    """A synthetic `record` time-stretched (`time_stretch`) to about `rate_bpm`, its heart rate,
    report and labels regenerated from the rate measured on the stretched signal (`measure.ecg_rhythm`,
    the one measurement), so the text states what the signal shows. None when fewer than two beats
    are found in the source or the result."""
    source = ecg_rhythm(record.signal, record.fs)
    if len(source.r_peaks) < 2:
        return None
    # Factors in steps of 1/100 keep the polyphase ratio small (100 / k).
    factor = round(rate_bpm / source.heart_rate_bpm, 2)
    signal = time_stretch(record.signal, record.fs, factor, source.r_peaks)
    measured = ecg_rhythm(signal, record.fs).heart_rate_bpm
    if not np.isfinite(measured):
        return None
    rate = round(float(measured), 1)
    return dataclasses.replace(record, signal=signal, record_id=record_id, patient_id=record_id,
                               source_path=f"<synthetic {record_id}>", heart_rate=rate,
                               report=synthetic_report(rate), labels=synthetic_labels(rate),
                               r_peaks=None)


def stretched_copies(records: Sequence[ECGRecord], copies: int, seed: int) -> list[ECGRecord]:
    """`copies` time-stretched versions of each synthetic record (`stretched_to_rate`) at rates
    drawn uniformly over `SYNTHETIC_RATES_BPM` from `seed`; ids `{record_id}_s{k}`. Other records
    are skipped: a real record's diagnoses (intervals, ectopy) need not survive a stretch. Training
    data only: a stretch adds (signal, rate) pairs whose answers differ, against memorising them."""
    rng = np.random.default_rng(seed)
    out = []
    synthetic = [r for r in records if r.record_id.startswith("synthetic_")]
    for record in tqdm(synthetic, desc=f"time-stretching synthetic ECGs (x{copies})",
                       unit="ECG", disable=len(synthetic) * copies < 50):
        rates = rng.uniform(*SYNTHETIC_RATES_BPM, size=copies)
        for k, rate in enumerate(rates):
            copy = stretched_to_rate(record, float(rate), f"{record.record_id}_s{k}")
            if copy is not None:
                out.append(copy)
    return out
