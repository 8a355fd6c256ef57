"""Reading one WFDB record (header + signal) with errors that name the file.

Every reader (Challenge, PTB-XL, MIMIC-IV-ECG, grounding, `uniecg interpret`) reads through
`read_wfdb_signal`, the one place a record is checked against its header before wfdb reads it:
  - the sampling rate is read from the header's record line itself: wfdb silently falls back to
    250 Hz when that field is not a number (`12 abc 5000`);
  - each signal file's size must match what the header declares (channels x samples x bytes per
    sample for the declared formats): a header declaring fewer channels than the file interleaves
    would otherwise read "fine" with scrambled leads, and a truncated file would fail inside numpy.

The common layout (MIMIC-IV-ECG, PTB-XL, the PhysioNet Challenges: one signal file in format 16,
every field of every signal line written) is read here with numpy (`_read_format16`), bit-identical
to wfdb.rdrecord's physical signal: wfdb parses each header through pandas (~2 ms a record, more
than reading the samples), the bulk of `uniecg prep`'s cost per record (issue 18). Any other
layout goes through wfdb.
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import numpy as np
import wfdb

from uniecg_jax.data.record import ECGRecord, make_record
from uniecg_jax.errors import RecordError

# Physical units -> factor to millivolts.
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}
# Bits one sample takes on disk, per WFDB storage format (WFDB "signal" spec: 212 packs two 12-bit
# samples in 3 bytes, 310/311 three 10-bit samples in 4 bytes). FLAC formats (508/516/524) are
# compressed: their size says nothing about the sample count, so they are not size-checked.
_FORMAT_BITS = {"8": 8, "16": 16, "24": 24, "32": 32, "61": 16, "80": 8, "160": 16, "212": 12,
                "310": 32 / 3, "311": 32 / 3}
# A format-16 signal line's storage field (`16`, `16x1`, `+byte_offset`) and gain field
# (`adc_gain(baseline)/units`); other spellings are left to wfdb.
_FORMAT16 = re.compile(r"^16(?:x1)?(?:\+([0-9]+))?$")
_GAIN_FIELD = re.compile(r"^(-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\((-?[0-9]+)\)/(\S+)$")
_FILE_NAME = re.compile(r"^[-\w]+\.\w+$")
# The record line's sampling-rate field: `fs[/counter_freq[(base_counter)]]`.
_RATE_FIELD = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?:/.*)?$")


def strip_wfdb_extension(path: str | os.PathLike) -> str:
    """`x/NNN.hea` / `x/NNN.dat` / `x/NNN.mat` / `x/NNN` -> `x/NNN` (what wfdb.rdrecord takes)."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    return root if ext.lower() in (".hea", ".dat", ".mat") else path


def _record_line(header_path: str) -> list[str]:
    """The header's record line (`name n_sig fs n_samples ...`) split into fields."""
    try:
        with open(header_path, encoding="latin-1") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RecordError(f"{header_path}: cannot read header ({e.strerror or e})") from None
    record_line = next((line.split("#", 1)[0].split() for line in lines
                        if line.split("#", 1)[0].strip()), None)
    if not record_line:
        raise RecordError(f"{header_path}: corrupt header (no record line)")
    return record_line


def _rate_of_record_line(record_line: list[str], header_path: str) -> float:
    if len(record_line) < 3:
        raise RecordError(f"{header_path}: the record line {' '.join(record_line)!r} declares no "
                          "sampling rate (wfdb would assume 250 Hz)")
    match = _RATE_FIELD.match(record_line[2])
    if not match:
        raise RecordError(f"{header_path}: sampling rate {record_line[2]!r} on the record line is "
                          "not a number")
    return float(match.group(1))


def header_sampling_rate(header_path: str) -> float:
    """The sampling rate written on the header's record line (`name n_sig fs n_samples ...`).

    Read from the text, not from wfdb: wfdb replaces a missing or non-numeric rate by 250 Hz without
    a word. Raises RecordError naming the header when the field is absent or not a number.
    """
    return _rate_of_record_line(_record_line(header_path), header_path)


def check_signal_files(header: Any, base: str, header_path: str) -> None:
    """Compares each signal file's size with what `header` (a `wfdb.Record` header) declares.

    For a file holding C channels of `samps_per_frame` s_c in format f_c, one frame takes
    sum_c s_c * bits(f_c) / 8 bytes, and the file holds byte_offset + sig_len frames. Raises
    RecordError for a missing file, a truncated one ("N samples of M expected") or one holding at
    least one whole frame more than declared (a header naming fewer channels than are stored).
    """
    directory = os.path.dirname(base)
    files: dict[str, list[int]] = {}
    for channel, name in enumerate(getattr(header, "file_name", None) or []):  # none: multi-segment
        files.setdefault(name, []).append(channel)
    for name, channels in files.items():
        formats = [str(header.fmt[c]) for c in channels]
        if any(f not in _FORMAT_BITS for f in formats):
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise RecordError(f"{header_path}: signal file missing ({path})")
        spf = [int((header.samps_per_frame or [1] * header.n_sig)[c] or 1) for c in channels]
        frame_bits = sum(s * _FORMAT_BITS[f] for s, f in zip(spf, formats))
        offset = int((header.byte_offset or [0] * header.n_sig)[channels[0]] or 0)
        data_bytes = os.path.getsize(path) - offset
        frames_stored = math.floor(data_bytes * 8 / frame_bits + 1e-9) if data_bytes > 0 else 0
        frame_bytes = math.ceil(frame_bits / 8)
        declared = f"{len(channels)} channel(s) in format {'/'.join(sorted(set(formats)))}"
        if header.sig_len is None:  # wfdb infers the length from the size: it must be whole frames
            if data_bytes % frame_bytes and frame_bits % 8 == 0:
                raise RecordError(f"{header_path}: {path} holds {data_bytes} data bytes, not a "
                                  f"whole number of frames of {declared}; the header does not "
                                  "match the signal file")
            continue
        expected_bytes = math.ceil(int(header.sig_len) * frame_bits / 8)
        if frames_stored < header.sig_len:
            raise RecordError(f"{header_path}: signal file truncated: {frames_stored} samples of "
                              f"{header.sig_len} expected ({path})")
        if data_bytes - expected_bytes >= frame_bytes:
            raise RecordError(
                f"{header_path}: {path} holds {data_bytes} data bytes but the header declares "
                f"{declared} x {header.sig_len} samples ({expected_bytes} bytes): more channels or "
                "samples are stored than the header declares")


def _read_header(base: str, header_path: str):
    try:
        header = wfdb.rdheader(base)
    except Exception as e:  # wfdb raises HeaderSyntaxError/ValueError/TypeError/... on bad headers
        raise RecordError(f"{header_path}: corrupt header ({str(e) or type(e).__name__})") from None
    _check_signal_count(header, header_path)
    return header


def _check_signal_count(header: Any, header_path: str) -> None:
    found = len(header.sig_name or [])
    if not header.n_sig or found != header.n_sig:
        raise RecordError(f"{header_path}: corrupt header (record line declares {header.n_sig} "
                          f"signals, {found} signal lines parse)")


def _read_checked_record(base: str, header_path: str):
    """(wfdb.Record, sampling rate) after the checks of the module docstring, header parsed once.

    wfdb parses a header through pandas (~2 ms, most of a record's read), and checking before
    reading would parse it twice. So a single-segment record whose header declares its length is
    read first and its fields checked after: a file that does not match its header either fails
    inside wfdb (then the checked path below names the problem) or reads and fails the same check.
    The declared length is taken from the header text, as wfdb shortens `sig_len` to what it read.
    """
    record_line = _record_line(header_path)
    declared_length = record_line[3] if len(record_line) > 3 else ""
    if "/" not in record_line[0] and declared_length.isdigit():  # "name/n_seg": multi-segment
        try:
            record = wfdb.rdrecord(base)
        except Exception:  # the checked path reads the header alone and says what is wrong
            record = None
        if record is not None:
            _check_signal_count(record, header_path)
            fs = _rate_of_record_line(record_line, header_path)
            declared = copy.copy(record)
            declared.sig_len = int(declared_length)
            check_signal_files(declared, base, header_path)
            return record, fs
    header = _read_header(base, header_path)
    fs = _rate_of_record_line(record_line, header_path)
    check_signal_files(header, base, header_path)
    try:
        record = wfdb.rdrecord(base)
    except FileNotFoundError as e:
        raise RecordError(f"{header_path}: signal file missing ({e.filename or e})") from None
    except Exception as e:  # wfdb raises ValueError/TypeError/IndexError/... on bad files
        raise RecordError(f"{header_path}: cannot read WFDB record: "
                          f"{str(e) or type(e).__name__}") from None
    return record, fs


def _read_format16(base: str, header_path: str
                   ) -> tuple[np.ndarray, list[str], float, list[str]] | None:
    """`read_wfdb_signal`'s result for a single-file format-16 record whose header spells out every
    field (see the module docstring), or None for any other layout (then wfdb reads it).

    Follows wfdb 4.x: comments are `#` lines stripped of " \t#"; the physical signal is
    (digital - baseline) / adc_gain in float64 with -32768 (format 16's missing sample) as NaN.
    """
    try:
        with open(header_path, encoding="latin-1") as f:
            text = f.read()
    except OSError as e:
        raise RecordError(f"{header_path}: cannot read header ({e.strerror or e})") from None
    lines, comments = [], []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            comments.append(line.strip(" \t#"))
        elif line:
            lines.append(line)
    record = lines[0].split() if lines else []
    if (len(record) < 4 or "#" in lines[0] or "/" in record[0] or not record[1].isdigit()
            or not record[3].isdigit() or not re.fullmatch(r"[0-9]*\.?[0-9]+", record[2])):
        return None
    n_sig, sig_len, fs = int(record[1]), int(record[3]), float(record[2])
    if n_sig == 0 or len(lines) != 1 + n_sig:
        return None
    files, offsets, gains, baselines, units, names = set(), set(), [], [], [], []
    for line in lines[1:]:
        fields = line.split(None, 8)   # file fmt gain res zero init checksum block description
        storage = _FORMAT16.match(fields[1]) if len(fields) == 9 and "#" not in line else None
        gain = _GAIN_FIELD.match(fields[2]) if storage else None
        if gain is None or not _FILE_NAME.match(fields[0]) or float(gain.group(1)) == 0:
            return None
        files.add(fields[0])
        offsets.add(int(storage.group(1) or 0))
        gains.append(float(gain.group(1)))
        baselines.append(int(gain.group(2)))
        units.append(gain.group(3))
        names.append(fields[8])
    if len(files) != 1 or len(offsets) != 1:
        return None
    (name,), (offset,) = files, offsets
    declared = dict(file_name=[name] * n_sig, fmt=["16"] * n_sig, samps_per_frame=[1] * n_sig,
                    byte_offset=[offset] * n_sig, n_sig=n_sig, sig_len=sig_len)
    check_signal_files(type("Header", (), declared), base, header_path)
    digital = np.fromfile(os.path.join(os.path.dirname(base), name), dtype="<i2",
                          count=n_sig * sig_len, offset=offset).reshape(sig_len, n_sig)
    physical = (digital - np.asarray(baselines, np.float64)) / np.asarray(gains, np.float64)
    physical[digital == -32768] = np.nan
    return _in_millivolts(physical.T.astype(np.float32), names, units, header_path), names, fs, \
        comments


def _in_millivolts(signal: np.ndarray, names: list[str], units: list[str], header_path: str
                   ) -> np.ndarray:
    """[C, T] signal in the header's units -> mV (in place); an unknown unit is an error."""
    for channel, unit in enumerate(units):
        factor = _UNIT_TO_MV.get((unit or "").strip().lower())
        if factor is None:
            raise RecordError(f"{header_path}: channel {names[channel]!r} has unit "
                              f"{unit!r}; expected mV, uV or V")
        if factor != 1.0:
            signal[channel] *= factor
    return signal


def read_wfdb_signal(path: str | os.PathLike) -> tuple[np.ndarray, list[str], float, list[str]]:
    """Reads a WFDB record after checking it against its header (see the module docstring).

    Returns ([C, T] float32 signal in mV, channel names, sampling rate, header comment lines).
    Raises RecordError naming the file for a missing file, a corrupt header, a non-numeric sampling
    rate, or a signal file whose size does not match the header (truncated, or more channels).
    """
    base = strip_wfdb_extension(path)
    header_path = base + ".hea"
    if not os.path.exists(header_path):
        raise RecordError(f"{header_path}: WFDB header not found")
    fast = _read_format16(base, header_path)
    if fast is not None:
        return fast
    record, fs = _read_checked_record(base, header_path)
    if record.p_signal is None or record.sig_name is None:
        raise RecordError(f"{header_path}: record has no signal channels")
    signal = np.asarray(record.p_signal, dtype=np.float32).T
    if signal.shape[1] != record.sig_len:
        raise RecordError(f"{header_path}: signal file truncated: {signal.shape[1]} samples of "
                          f"{record.sig_len} expected")
    units = record.units or [""] * len(record.sig_name)
    signal = _in_millivolts(signal, list(record.sig_name), units, header_path)
    return signal, list(record.sig_name), fs, list(record.comments or [])


def read_wfdb_record(path: str | os.PathLike, *, record_id: str | None = None,
                     missing_leads: str = "error", expected_fs: float | None = None,
                     **metadata: Any) -> ECGRecord:
    """A WFDB record as a validated ECGRecord (metadata passed through unchanged)."""
    base = strip_wfdb_extension(path)
    signal, names, fs, _ = read_wfdb_signal(base)
    return make_record(signal, names, fs, path=base + ".hea",
                       record_id=record_id or os.path.basename(base),
                       missing_leads=missing_leads, expected_fs=expected_fs, **metadata)
