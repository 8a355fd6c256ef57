"""MIMIC-IV-ECG: `record_list.csv` (subject_id, study_id, path) and `machine_measurements.csv`
(`report_0..report_17`, `rr_interval` in ms, onsets/ends in ms, axes in degrees). Records are
`files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN` at 500 Hz, leads I II III aVR aVF aVL V1-V6 (aVF before aVL:
the reader maps leads by name). A record at another rate is kept at its own rate (`record.fs`), as
every reader does; the pipelines resample it to each model's rate."""
from __future__ import annotations

import math
import os

import pandas as pd

from uniecg_jax.data.readers.wfdb_io import read_wfdb_signal
from uniecg_jax.data.record import ECGRecord, make_record
from uniecg_jax.errors import RecordError

RECORD_LIST_CSV = "record_list.csv"
MEASUREMENTS_CSV = "machine_measurements.csv"
REPORT_COLUMNS = tuple(f"report_{i}" for i in range(18))
# Plausible ranges; the machine writes out-of-range sentinels (e.g. 29999) for "not measured".
MEASUREMENT_RANGES = {
    "rr_interval": (200.0, 3000.0),      # ms, i.e. 20-300 bpm
    "p_onset": (0.0, 10000.0), "p_end": (0.0, 10000.0), "qrs_onset": (0.0, 10000.0),
    "qrs_end": (0.0, 10000.0), "t_end": (0.0, 10000.0),
    "p_axis": (-180.0, 360.0), "qrs_axis": (-180.0, 360.0), "t_axis": (-180.0, 360.0),
}


def clean_measurements(row: dict) -> dict[str, float]:
    """The machine measurements of one row, with NaN and out-of-range sentinels dropped."""
    cleaned = {}
    for name, (low, high) in MEASUREMENT_RANGES.items():
        try:
            value = float(row.get(name))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and low <= value <= high:
            cleaned[name] = value
    return cleaned


def join_report(row: dict) -> tuple[str, tuple[str, ...]]:
    """report_0..report_17 -> ("line one. line two.", (line one, line two)); empty lines dropped."""
    lines = []
    for column in REPORT_COLUMNS:
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            lines.append(value.strip().rstrip("."))
    return ". ".join(lines) + ("." if lines else ""), tuple(lines)


class MimicDataset:
    """A MIMIC-IV-ECG root (the folder holding record_list.csv, machine_measurements.csv, files/)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        list_path = os.path.join(self.root, RECORD_LIST_CSV)
        try:
            records = pd.read_csv(list_path, dtype={"path": str})
        except (OSError, ValueError) as e:
            raise RecordError(f"{list_path}: cannot read: {e}") from None
        missing = {"subject_id", "study_id", "path"} - set(records.columns)
        if missing:
            raise RecordError(f"{list_path}: missing column(s) {sorted(missing)}")
        self.records = {int(r.study_id): (int(r.subject_id), str(r.path))
                        for r in records.itertuples(index=False)}
        self.measurements: dict[int, dict] = {}
        measurements_path = os.path.join(self.root, MEASUREMENTS_CSV)
        if os.path.exists(measurements_path):
            table = pd.read_csv(measurements_path, low_memory=False)
            for row in table.to_dict("records"):
                self.measurements[int(row["study_id"])] = row

    def study_ids(self) -> list[int]:
        return sorted(self.records)

    def patient_id(self, study_id: int) -> str:
        return str(self.records[study_id][0])

    def record_path(self, study_id: int) -> str:
        return os.path.join(self.root, self.records[study_id][1])

    def read(self, study_id: int, *, missing_leads: str = "error", min_seconds: float = 1.0
             ) -> ECGRecord:
        """One study -> ECGRecord with report, machine measurements and RR-derived heart rate."""
        if study_id not in self.records:
            raise RecordError(f"{self.root}/{RECORD_LIST_CSV}: no study_id {study_id}")
        subject_id, relative = self.records[study_id]
        base = os.path.join(self.root, relative)
        signal, names, fs, _ = read_wfdb_signal(base)
        row = self.measurements.get(study_id, {})
        report, lines = join_report(row)
        measurements = clean_measurements(row)
        rr = measurements.get("rr_interval")
        return make_record(signal, names, fs, path=base + ".hea", record_id=f"mimic_{study_id}",
                           missing_leads=missing_leads, min_seconds=min_seconds,
                           patient_id=str(subject_id), report=report, labels=lines,
                           measurements=measurements,
                           heart_rate=60000.0 / rr if rr else None)
