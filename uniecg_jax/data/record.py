"""The canonical ECG record every reader returns and every pipeline consumes.

A record holds the signal as float32 millivolts, shape [12, T], leads in the order `LEADS`, plus its
sampling rate and metadata. Sources disagree on lead order (MIMIC-IV-ECG stores aVF before aVL) and
naming, so leads are always mapped by name, never by position.
"""
from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from uniecg_jax.errors import RecordError

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
NUM_LEADS = len(LEADS)
# The row order an ECG encoder was trained on: "canonical" = `LEADS`; "mimic_iv" = the file order of
# MIMIC-IV-ECG (aVF before aVL), which ECG-CoCa and GEM read unmapped (GEM train.py: wfdb.rdsamp,
# transpose, no renaming), so their weights expect aVF in row 4 and aVL in row 5.
ENCODER_LEAD_ORDERS = {
    "canonical": LEADS,
    "mimic_iv": ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"),
}


def to_encoder_lead_order(signal: np.ndarray, order: str) -> np.ndarray:
    """[..., 12, T] in `LEADS` order -> the same leads in the row order `order` (a key of
    `ENCODER_LEAD_ORDERS`) that the model's ECG encoder was trained on."""
    if order not in ENCODER_LEAD_ORDERS:
        raise ValueError(f"unknown ECG lead order {order!r}; choose from "
                         f"{sorted(ENCODER_LEAD_ORDERS)}")
    rows = [LEADS.index(lead) for lead in ENCODER_LEAD_ORDERS[order]]
    return np.asarray(signal)[..., rows, :]


def to_canonical_lead_order(signal: np.ndarray, order: str) -> np.ndarray:
    """The inverse of `to_encoder_lead_order`: [..., 12, T] in the encoder's `order` -> `LEADS`
    order (what the renderer and the writers take)."""
    if order not in ENCODER_LEAD_ORDERS:
        raise ValueError(f"unknown ECG lead order {order!r}; choose from "
                         f"{sorted(ENCODER_LEAD_ORDERS)}")
    rows = [ENCODER_LEAD_ORDERS[order].index(lead) for lead in LEADS]
    return np.asarray(signal)[..., rows, :]

# The ECG encoder (ECG-CoCa / GEM) reads 10 s at 500 Hz.
ENCODER_FS = 500.0
ENCODER_LENGTH = 5000
# DiffuSETS reads 10 s resampled to 1024 samples, i.e. 102.4 Hz.
DIFFUSION_LENGTH = 1024
DIFFUSION_FS = 102.4
RECORD_SECONDS = 10.0
# DiffuSETS conditions on age and heart rate as numbers; unknown values get these (and a 0 in
# `condition_known`) instead of NaN, and generation requests that state none get them too.
UNKNOWN_AGE, UNKNOWN_HEART_RATE = 50.0, 70.0

# Sampling rates outside this range are not 12-lead diagnostic ECGs (or a corrupt header).
MIN_FS, MAX_FS = 50.0, 10000.0
# Below this peak-to-peak amplitude (mV) on every present lead the signal carries no ECG.
FLAT_THRESHOLD_MV = 1e-3

_LEAD_ALIASES = {
    "i": "I", "ii": "II", "iii": "III", "avr": "aVR", "avl": "aVL", "avf": "aVF",
    "lead i": "I", "lead ii": "II", "lead iii": "III", "d1": "I", "d2": "II", "d3": "III",
    "mlii": "II", "ml2": "II", "-avr": None,
}
for _n in range(1, 7):
    _LEAD_ALIASES[f"v{_n}"] = f"V{_n}"
    _LEAD_ALIASES[f"lead v{_n}"] = f"V{_n}"
    _LEAD_ALIASES[f"c{_n}"] = f"V{_n}"
# Channels some sources record next to the 12 standard leads; they are dropped, not an error.
_EXTRA_CHANNELS = {"vx", "vy", "vz", "x", "y", "z", "v3r", "v4r", "v5r", "v7", "v8", "v9",
                   "-avr", "resp", "pleth", "abp", "spo2", "marker", "trigger"}


def bundled_samples_dir() -> pathlib.Path:
    """The shipped sample folder: 50 PhysioNet Challenge 2021 records (`cinc2021/`), the dx mapping
    tables, PTB-XL rows and SCP statements (see its README.md for attribution). It lives here, below
    `readers/`, so that the readers use it without importing the `uniecg_jax.data` package."""
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / "ecg_samples"


@dataclasses.dataclass(frozen=True)
class ECGRecord:
    """One 12-lead ECG with its metadata.

    signal: [12, T] float32 in mV, leads in `LEADS` order; missing leads are zero with
      `lead_mask` False.
    fs: sampling rate in Hz.
    lead_mask: [12] bool, True where the lead was recorded.
    nan_count: how many NaN/Inf samples the source held (replaced by 0).
    sex: "M", "F" or None. age in years, heart_rate in bpm, or None when unknown.
    report: free text (joined report lines or verbalised diagnoses); labels: diagnosis names.
    measurements: machine measurements (ms / degrees), sentinel values already removed.
    r_peaks: R-peak times in seconds from the record's start (QRS detection), None if not measured.
    """

    signal: np.ndarray
    fs: float
    record_id: str
    lead_mask: np.ndarray = dataclasses.field(
        default_factory=lambda: np.ones(NUM_LEADS, dtype=bool))
    nan_count: int = 0
    source_path: str = ""
    patient_id: str | None = None
    age: float | None = None
    sex: str | None = None
    heart_rate: float | None = None
    report: str = ""
    labels: tuple[str, ...] = ()
    measurements: Mapping[str, float] = dataclasses.field(default_factory=dict)
    r_peaks: tuple[float, ...] | None = None

    @property
    def num_samples(self) -> int:
        return int(self.signal.shape[1])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.fs

    @property
    def sex_code(self) -> float:
        """DiffuSETS encoding: M = 1, F = 0; unknown = 0.5 (halfway, so it biases neither)."""
        return {"M": 1.0, "F": 0.0}.get(self.sex or "", 0.5)

    def resampled(self, target_fs: float) -> "ECGRecord":
        """The same record at `target_fs` Hz (polyphase, anti-aliased)."""
        return dataclasses.replace(
            self, signal=resample(self.signal, self.fs, target_fs), fs=float(target_fs))

    def fixed_length(self, length: int) -> "ECGRecord":
        """The record cropped (keeps the start) or zero-padded at the end to `length` samples."""
        return dataclasses.replace(self, signal=pad_or_crop(self.signal, length))

    def to_encoder_input(self) -> np.ndarray:
        """[12, 5000] float32: 10 s at 500 Hz, as the ECG encoder reads it."""
        return _at_rate_and_length(self, ENCODER_FS, ENCODER_LENGTH)

    def to_diffusion_input(self) -> np.ndarray:
        """[12, 1024] float32: 10 s at 102.4 Hz, as the DiffuSETS VAE reads it."""
        return _at_rate_and_length(self, DIFFUSION_FS, DIFFUSION_LENGTH)


def _at_rate_and_length(record: ECGRecord, fs: float, length: int) -> np.ndarray:
    signal = record.signal if math.isclose(record.fs, fs) else resample(record.signal, record.fs, fs)
    return pad_or_crop(signal, length)


def canonical_lead_name(name: str) -> str | None:
    """The `LEADS` name for a source channel name, None for a known extra channel.

    Raises KeyError for a name that is neither a lead nor a known extra channel.
    """
    key = name.strip().lower()
    if key in _LEAD_ALIASES and _LEAD_ALIASES[key] is not None:
        return _LEAD_ALIASES[key]
    if key in _EXTRA_CHANNELS:
        return None
    raise KeyError(name)


def map_leads(signal: np.ndarray, names: Sequence[str], *, path: str,
              missing_leads: str = "error") -> tuple[np.ndarray, np.ndarray]:
    """Reorder source channels into `LEADS` order by name.

    Args:
      signal: [C, T] channels in source order.
      names: the C channel names (case-insensitive, aliases such as `MLII`, `C1` accepted).
      path: the file, for error messages.
      missing_leads: "error" raises on a missing lead; "zero" fills it with zeros and masks it.
    Returns:
      ([12, T] float32 signal, [12] bool lead mask).
    """
    if missing_leads not in ("error", "zero"):
        raise ValueError(f"missing_leads must be 'error' or 'zero', got {missing_leads!r}")
    if signal.ndim != 2 or signal.shape[0] != len(names):
        raise RecordError(f"{path}: signal has shape {signal.shape} but the header names "
                          f"{len(names)} channels")
    out = np.zeros((NUM_LEADS, signal.shape[1]), dtype=np.float32)
    mask = np.zeros(NUM_LEADS, dtype=bool)
    for channel, name in enumerate(names):
        try:
            lead = canonical_lead_name(name)
        except KeyError:
            raise RecordError(f"{path}: unknown lead name {name!r} (channel {channel}); expected "
                              f"one of {', '.join(LEADS)} or a known extra channel") from None
        if lead is None:
            continue
        index = LEADS.index(lead)
        if mask[index]:
            raise RecordError(f"{path}: lead {lead} appears twice (channel {channel} {name!r})")
        out[index] = signal[channel]
        mask[index] = True
    if not mask.all() and missing_leads == "error":
        absent = [lead for lead, present in zip(LEADS, mask) if not present]
        raise RecordError(f"{path}: missing lead(s) {', '.join(absent)} (have {list(names)}); "
                          "pass missing_leads='zero' to zero-fill and mask them")
    return out, mask


def resample(signal: np.ndarray, source_fs: float, target_fs: float) -> np.ndarray:
    """Polyphase resampling of [..., T] from `source_fs` to `target_fs` Hz -> [..., T'] float32.

    T' = round(T * target_fs / source_fs). 500 -> 102.4 Hz is the exact ratio 128/625. The one
    resampler of the package (records, generated ECGs, QRS detection). DiffuSETS publishes no
    preprocessing code (PKUDigitalHealth/DiffuSETS @ b610a00 ships only precomputed latents), so the
    choice is ours: scipy's polyphase filter with its default Kaiser(5) anti-aliasing FIR, as the
    former `diffusion.pipeline.resample_to` did too (they agree to 2e-7 mV); kept from this copy:
    the exact output length, float32 output, and the ratio found to 1/10000 (not 1/1000).
    """
    if math.isclose(source_fs, target_fs):
        return np.asarray(signal, dtype=np.float32)
    # scipy.signal takes 0.5-3 s to import and this module is on every command's path (`uniecg
    # interpret` of a 500 Hz record never resamples), so it is imported only when a record is.
    import scipy.signal

    ratio = fractions.Fraction(target_fs / source_fs).limit_denominator(10000)
    up, down = ratio.numerator, ratio.denominator
    out = scipy.signal.resample_poly(np.asarray(signal, dtype=np.float64), up, down, axis=-1,
                                     window=_antialias_filter(up, down))
    expected = int(round(np.shape(signal)[-1] * target_fs / source_fs))
    return pad_or_crop(out.astype(np.float32), expected)


@functools.lru_cache(maxsize=32)
def _antialias_filter(up: int, down: int) -> np.ndarray:
    """resample_poly's own default FIR (Kaiser, beta 5), designed once per ratio: designing it is
    most of the cost of resampling one 10 s record."""
    import scipy.signal  # see `resample`

    max_rate = max(up, down)
    half_length = 10 * max_rate
    taps = scipy.signal.firwin(2 * half_length + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    taps.setflags(write=False)
    return taps


def pad_or_crop(signal: np.ndarray, length: int) -> np.ndarray:
    """[C, T] -> [C, length] float32: keep the first `length` samples or zero-pad at the end."""
    signal = np.asarray(signal, dtype=np.float32)
    if signal.shape[-1] >= length:
        return np.ascontiguousarray(signal[..., :length])
    padding = [(0, 0)] * (signal.ndim - 1) + [(0, length - signal.shape[-1])]
    return np.pad(signal, padding)


def replace_nonfinite(signal: np.ndarray) -> tuple[np.ndarray, int]:
    """NaN/Inf -> 0 (what GEM does); returns (clean [C, T] float32, number replaced)."""
    signal = np.asarray(signal, dtype=np.float32)
    bad = ~np.isfinite(signal)
    count = int(bad.sum())
    if count:
        signal = np.where(bad, np.float32(0), signal)
    return signal, count


def validate_sampling_rate(fs: Any, *, path: str, expected_fs: float | None = None) -> float:
    """Checks a header's sampling rate; returns it as float. Raises RecordError naming `path`."""
    try:
        fs = float(fs)
    except (TypeError, ValueError):
        raise RecordError(f"{path}: sampling rate {fs!r} is not a number") from None
    if not math.isfinite(fs) or not MIN_FS <= fs <= MAX_FS:
        raise RecordError(f"{path}: unsupported sampling rate {fs} Hz (supported: {MIN_FS:g}-"
                          f"{MAX_FS:g} Hz)")
    if expected_fs is not None and not math.isclose(fs, expected_fs):
        raise RecordError(f"{path}: sampling rate is {fs:g} Hz but this source's records are "
                          f"{expected_fs:g} Hz")
    return fs


def short_record_warning(record: ECGRecord) -> str | None:
    """A warning when `record` is shorter than the RECORD_SECONDS the models read (it will be
    zero-padded to 10 s), else None. Single-record commands print it; prep counts such records."""
    if record.duration_s >= RECORD_SECONDS - 1e-6:
        return None
    padded = 1.0 - record.duration_s / RECORD_SECONDS
    return (f"{record.source_path or record.record_id}: record is {record.duration_s:.3g} s long; "
            f"it is zero-padded to {RECORD_SECONDS:g} s ({padded:.0%} zeros)")


def make_record(raw_signal: np.ndarray, names: Sequence[str], fs: Any, *, path: str,
                record_id: str, missing_leads: str = "error", expected_fs: float | None = None,
                min_seconds: float = 1.0, **metadata: Any) -> ECGRecord:
    """Builds and validates an ECGRecord from source channels.

    raw_signal: [C, T] in mV (any float dtype), channels named by `names`.
    Raises RecordError naming `path` for: unknown/missing/duplicate leads, an unsupported or
    unexpected sampling rate, a signal shorter than `min_seconds`, an all-NaN or flat signal. A lead
    with no finite sample counts as missing (an error, or zero-filled with `lead_mask` False).
    """
    fs = validate_sampling_rate(fs, path=path, expected_fs=expected_fs)
    raw_signal = np.asarray(raw_signal)
    if raw_signal.ndim != 2 or raw_signal.shape[1] < min_seconds * fs:
        raise RecordError(f"{path}: signal shape {raw_signal.shape} is shorter than "
                          f"{min_seconds:g} s at {fs:g} Hz")
    signal, mask = map_leads(raw_signal, names, path=path, missing_leads=missing_leads)
    present = signal[mask]
    if present.size and not np.isfinite(present).any():
        raise RecordError(f"{path}: signal is entirely NaN/Inf")
    # A lead with no finite sample was not recorded: it is zero-filled like any missing lead and
    # must say so in `lead_mask` (the model masks it), not pass as a recorded flat line.
    dead = mask & ~np.isfinite(signal).any(axis=1)
    if dead.any():
        dead_names = ", ".join(lead for lead, is_dead in zip(LEADS, dead) if is_dead)
        if missing_leads == "error":
            raise RecordError(f"{path}: lead(s) {dead_names} entirely NaN/Inf (not recorded); "
                              "pass missing_leads='zero' to zero-fill and mask them")
        mask = mask & ~dead
    signal, nan_count = replace_nonfinite(signal)
    present = signal[mask]
    if not mask.any() or np.ptp(present, axis=1).max() < FLAT_THRESHOLD_MV:
        raise RecordError(f"{path}: flat signal (peak-to-peak below {FLAT_THRESHOLD_MV} mV on "
                          "every lead)")
    return ECGRecord(signal=signal, fs=fs, record_id=str(record_id), lead_mask=mask,
                     nan_count=nan_count, source_path=str(path), **metadata)
