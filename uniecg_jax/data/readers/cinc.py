"""PhysioNet/CinC Challenge 2021 records: WFDB `.hea` + `.mat`, header comments `# Age:`, `# Sex:`,
`# Dx:` (comma-separated SNOMED-CT codes) verbalised through the challenge's dx mapping tables."""
from __future__ import annotations

import csv
import functools
import math
import os

from uniecg_jax.data.readers.wfdb_io import read_wfdb_signal, strip_wfdb_extension
from uniecg_jax.data.record import ECGRecord, bundled_samples_dir, make_record
from uniecg_jax.errors import RecordError

DX_TABLE_NAMES = ("dx_mapping_scored.csv", "dx_mapping_unscored.csv")


@functools.lru_cache(maxsize=8)
def load_dx_mapping(directory: str) -> dict[str, str]:
    """SNOMED-CT code -> diagnosis name, from the challenge's dx_mapping_*.csv in `directory`."""
    mapping: dict[str, str] = {}
    for name in DX_TABLE_NAMES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    mapping[row["SNOMEDCTCode"].strip()] = row["Dx"].strip()
                except KeyError as e:
                    raise RecordError(f"{path}: missing column {e}") from None
    return mapping


def parse_header_comments(comments: list[str], *, path: str) -> dict[str, str]:
    """`["Age: 78", "Sex: Male", ...]` -> {"age": "78", "sex": "Male", ...} (keys lower-case)."""
    fields = {}
    for line in comments:
        key, sep, value = line.lstrip("#").partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def parse_age(text: str | None) -> float | None:
    try:
        age = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return age if math.isfinite(age) and 0 <= age < 130 else None


def parse_sex(text: str | None) -> str | None:
    value = (text or "").strip().lower()
    if value in ("male", "m", "1"):
        return "M"
    if value in ("female", "f", "0"):
        return "F"
    return None


def verbalise_dx(codes: list[str], mapping: dict[str, str]) -> list[str]:
    """SNOMED codes -> names; an unmapped code is kept as `SNOMED <code>` so nothing is lost."""
    return [mapping.get(code, f"SNOMED {code}") for code in codes]


def read_cinc_record(path: str | os.PathLike, *, dx_mapping_dir: str | None = None,
                     missing_leads: str = "error", expected_fs: float | None = None,
                     min_seconds: float = 1.0) -> ECGRecord:
    """One Challenge record (path with or without extension) -> ECGRecord.

    dx_mapping_dir: folder of dx_mapping_scored/unscored.csv; default: the record's parent folder,
    then the bundled tables.
    The report is the verbalised diagnoses joined with ", " (e.g. "sinus rhythm, left axis deviation").
    """
    base = strip_wfdb_extension(path)
    signal, names, fs, comments = read_wfdb_signal(base)
    fields = parse_header_comments(comments, path=base + ".hea")
    codes = [c.strip() for c in fields.get("dx", "").split(",") if c.strip()]
    if dx_mapping_dir is None:
        parent = os.path.dirname(os.path.dirname(os.path.abspath(base)))
        if any(os.path.exists(os.path.join(parent, n)) for n in DX_TABLE_NAMES):
            dx_mapping_dir = parent
        else:
            dx_mapping_dir = str(bundled_samples_dir())
    labels = tuple(verbalise_dx(codes, load_dx_mapping(dx_mapping_dir)))
    return make_record(
        signal, names, fs, path=base + ".hea", record_id=os.path.basename(base),
        missing_leads=missing_leads, expected_fs=expected_fs, min_seconds=min_seconds,
        patient_id=os.path.basename(base), age=parse_age(fields.get("age")),
        sex=parse_sex(fields.get("sex")), report=", ".join(labels), labels=labels)
