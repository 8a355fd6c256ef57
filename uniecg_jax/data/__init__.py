"""The ECG data layer, one home per ingredient: the canonical record, resampling and constants
(`record`), readers per source, rhythm and heart-rate measurement (`measure`), the patient split
(`splits`), synthetic ECGs and their cache (`synthetic`), the bundled training data (`bundled`),
prompt templates (`prompts`), the frozen text encoders (`text_encoder`), the tiny tokenizer,
conversations and grain pipelines.

Entry points: `read_record(path)`, `load_bundled_records()`, `bundled_samples_dir()`,
`ECGRecord.to_encoder_input()` / `.to_diffusion_input()`.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os

from uniecg_jax.data.record import (DIFFUSION_FS, DIFFUSION_LENGTH, ENCODER_FS, ENCODER_LENGTH,
                                    LEADS, ECGRecord, bundled_samples_dir, make_record,
                                    pad_or_crop, resample)

__all__ = ["LEADS", "ENCODER_FS", "ENCODER_LENGTH", "DIFFUSION_FS", "DIFFUSION_LENGTH", "ECGRecord",
           "make_record", "pad_or_crop", "resample", "read_record", "bundled_samples_dir",
           "bundled_record_paths", "load_bundled_records"]


def bundled_record_paths() -> list[str]:
    """Sorted paths (without extension) of the 50 bundled Challenge records."""
    return sorted(p[:-4] for p in glob.glob(str(bundled_samples_dir() / "cinc2021" / "*.hea")))


def read_record(path: str | os.PathLike, *, missing_leads: str = "error",
                expected_fs: float | None = None) -> ECGRecord:
    """Reads one WFDB record (path with or without `.hea`) into an ECGRecord.

    Challenge-style header comments (`# Age:`, `# Sex:`, `# Dx:`) become metadata and a report;
    other records get the signal only. Raises RecordError naming the file and the problem.
    """
    # The readers are imported on first use, not at the top: this package `__init__` runs on every
    # `uniecg_jax.data.*` import (the CLI's argument modules among them, so `uniecg --help`), and
    # the readers pull wfdb and pandas (~0.5 s). The readers import `record`, never this package.
    from uniecg_jax.data.readers.cinc import read_cinc_record

    return read_cinc_record(path, missing_leads=missing_leads, expected_fs=expected_fs)


def ptbxl_rows_near(root: str | os.PathLike) -> dict:
    return dict(_ptbxl_rows_near(os.fspath(root)))


@functools.lru_cache(maxsize=16)
def _ptbxl_rows_near(root: str) -> dict:
    """PTB-XL rows (ecg_id -> PTBXLRow) from a `ptbxl_database*.csv` + `scp_statements.csv` in
    `root`, or {} when there is none. Challenge `HR0xxxx` records are PTB-XL ecg_id xxxx."""
    from uniecg_jax.data.readers.ptbxl import load_ptbxl_rows  # lazy: see read_record

    tables = sorted(glob.glob(os.path.join(os.fspath(root), "ptbxl_database*.csv")))
    statements = os.path.join(os.fspath(root), "scp_statements.csv")
    if not tables or not os.path.exists(statements):
        return {}
    rows = {}
    for table in tables:
        rows.update(load_ptbxl_rows(table, statements))
    return rows


def with_ptbxl_metadata(record: ECGRecord, ptbxl_rows: dict) -> ECGRecord:
    """A Challenge `HR0xxxx` record with its PTB-XL patient id and free-text report (when present)."""
    name = record.record_id
    if not (name.startswith("HR") and name[2:].isdigit() and int(name[2:]) in ptbxl_rows):
        return record
    row = ptbxl_rows[int(name[2:])]
    return dataclasses.replace(record, patient_id=f"ptbxl_{row.patient_id}",
                               report=row.report or record.report)


def load_bundled_records() -> list[ECGRecord]:
    """The 50 bundled records. The 10 `HR0600k` ones (PTB-XL ecg_id 600k) carry the cardiologist's
    free-text PTB-XL report and patient id; the others a report verbalised from their SNOMED codes."""
    rows = ptbxl_rows_near(bundled_samples_dir())
    return [with_ptbxl_metadata(read_record(path), rows) for path in bundled_record_paths()]
