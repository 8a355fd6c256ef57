"""Reading one WFDB record (header + signal) with errors that name the file."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import wfdb

from uniecg_jax.data.record import ECGRecord, make_record
from uniecg_jax.errors import RecordError

# Physical units -> factor to millivolts.
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}


def strip_wfdb_extension(path: str | os.PathLike) -> str:
    """`x/NNN.hea` / `x/NNN.dat` / `x/NNN.mat` / `x/NNN` -> `x/NNN` (what wfdb.rdrecord takes)."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    return root if ext.lower() in (".hea", ".dat", ".mat") else path


def _raise_if_header_corrupt(base: str, header_path: str) -> None:
    """Called after wfdb failed: says "corrupt header" when the header itself does not parse (wfdb
    re-parses it here; on the success path it is parsed only once, by rdrecord)."""
    try:
        header = wfdb.rdheader(base)
    except Exception as e:  # wfdb raises HeaderSyntaxError/ValueError/TypeError/... on bad headers
        raise RecordError(f"{header_path}: corrupt header ({str(e) or type(e).__name__})") from None
    found = len(header.sig_name or [])
    if not header.n_sig or found != header.n_sig:
        raise RecordError(f"{header_path}: corrupt header (record line declares {header.n_sig} "
                          f"signals, {found} signal lines parse)")


def read_wfdb_signal(path: str | os.PathLike) -> tuple[np.ndarray, list[str], float, list[str]]:
    """Reads a WFDB record.

    Returns ([C, T] float32 signal in mV, channel names, sampling rate, header comment lines).
    Raises RecordError naming the file for a missing file, a corrupt header or a truncated signal.
    """
    base = strip_wfdb_extension(path)
    header_path = base + ".hea"
    if not os.path.exists(header_path):
        raise RecordError(f"{header_path}: WFDB header not found")
    try:
        record = wfdb.rdrecord(base)
    except FileNotFoundError as e:
        raise RecordError(f"{header_path}: signal file missing ({e.filename or e})") from None
    except Exception as e:  # wfdb raises ValueError/TypeError/IndexError/... on bad files
        _raise_if_header_corrupt(base, header_path)
        problem = str(e) or type(e).__name__
        if "not loaded correctly" in problem:
            problem = "signal file is truncated (fewer samples than the header declares)"
        raise RecordError(f"{header_path}: cannot read WFDB record: {problem}") from None
    if record.p_signal is None or record.sig_name is None:
        raise RecordError(f"{header_path}: record has no signal channels")
    signal = np.asarray(record.p_signal, dtype=np.float32).T
    if signal.shape[1] != record.sig_len:
        raise RecordError(f"{header_path}: signal file is truncated ({signal.shape[1]} of "
                          f"{record.sig_len} samples)")
    units = record.units or [""] * len(record.sig_name)
    for channel, unit in enumerate(units):
        factor = _UNIT_TO_MV.get((unit or "").strip().lower())
        if factor is None:
            raise RecordError(f"{header_path}: channel {record.sig_name[channel]!r} has unit "
                              f"{unit!r}; expected mV, uV or V")
        if factor != 1.0:
            signal[channel] *= factor
    return signal, list(record.sig_name), float(record.fs), list(record.comments or [])


def read_wfdb_record(path: str | os.PathLike, *, record_id: str | None = None,
                     missing_leads: str = "error", expected_fs: float | None = None,
                     **metadata: Any) -> ECGRecord:
    """A WFDB record as a validated ECGRecord (metadata passed through unchanged)."""
    base = strip_wfdb_extension(path)
    signal, names, fs, _ = read_wfdb_signal(base)
    return make_record(signal, names, fs, path=base + ".hea",
                       record_id=record_id or os.path.basename(base),
                       missing_leads=missing_leads, expected_fs=expected_fs, **metadata)
