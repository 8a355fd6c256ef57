"""PTB-XL: `ptbxl_database.csv` (free-text `report`, `scp_codes`, age, sex, patient) joined with
`scp_statements.csv` (SCP code -> description) and the WFDB records under `records500/` (or
`records100/` where only those are present). Records keep their own rate (`record.fs`), as every
reader does; the pipelines resample them to each model's rate."""
from __future__ import annotations

import ast
import dataclasses
import os

import pandas as pd

from uniecg_jax.data.readers.cinc import parse_age
from uniecg_jax.data.readers.wfdb_io import read_wfdb_signal
from uniecg_jax.data.record import ECGRecord, make_record
from uniecg_jax.errors import RecordError

DATABASE_CSV = "ptbxl_database.csv"
STATEMENTS_CSV = "scp_statements.csv"


@dataclasses.dataclass(frozen=True)
class PTBXLRow:
    ecg_id: int
    patient_id: str | None
    age: float | None
    sex: str | None
    report: str
    labels: tuple[str, ...]
    filename_hr: str
    filename_lr: str


def load_scp_statements(path: str) -> dict[str, str]:
    """SCP code -> description (the first, unnamed column holds the code)."""
    try:
        table = pd.read_csv(path, index_col=0)
        return {str(code): str(desc) for code, desc in table["description"].items()}
    except (OSError, KeyError, ValueError) as e:
        raise RecordError(f"{path}: cannot read SCP statements: {e}") from None


def load_ptbxl_rows(database_csv: str, statements_csv: str) -> dict[int, PTBXLRow]:
    """ecg_id -> PTBXLRow. `scp_codes` ({'NORM': 100.0, 'SR': 0.0}) become descriptions ordered by
    likelihood; PTB-XL sex 0 = male, 1 = female."""
    statements = load_scp_statements(statements_csv)
    try:
        table = pd.read_csv(database_csv)
    except (OSError, ValueError) as e:
        raise RecordError(f"{database_csv}: cannot read: {e}") from None
    missing = {"ecg_id", "report", "scp_codes", "filename_hr"} - set(table.columns)
    if missing:
        raise RecordError(f"{database_csv}: missing column(s) {sorted(missing)}")
    rows = {}
    for row in table.itertuples(index=False):
        try:
            codes = ast.literal_eval(row.scp_codes) if isinstance(row.scp_codes, str) else {}
        except (ValueError, SyntaxError):
            raise RecordError(f"{database_csv}: ecg_id {row.ecg_id}: malformed scp_codes "
                              f"{row.scp_codes!r}") from None
        ordered = sorted(codes.items(), key=lambda item: -float(item[1]))
        labels = tuple(statements.get(code, code) for code, _ in ordered)
        patient = getattr(row, "patient_id", None)
        sex = getattr(row, "sex", None)
        rows[int(row.ecg_id)] = PTBXLRow(
            ecg_id=int(row.ecg_id),
            patient_id=None if patient is None or patient != patient else str(int(patient)),
            age=parse_age(str(getattr(row, "age", ""))),
            sex={0: "M", 1: "F"}.get(int(sex)) if sex == sex and sex is not None else None,
            report=str(row.report).strip() if isinstance(row.report, str) else "",
            labels=labels, filename_hr=str(row.filename_hr),
            filename_lr=str(getattr(row, "filename_lr", "")))
    return rows


class PTBXLDataset:
    """A PTB-XL root (the folder holding ptbxl_database.csv, scp_statements.csv, records500/)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        self.rows = load_ptbxl_rows(os.path.join(self.root, DATABASE_CSV),
                                    os.path.join(self.root, STATEMENTS_CSV))

    def ecg_ids(self) -> list[int]:
        return sorted(self.rows)

    def record_path(self, ecg_id: int, high_rate: bool = True) -> str:
        row = self.rows[ecg_id]
        return os.path.join(self.root, row.filename_hr if high_rate else row.filename_lr)

    def read(self, ecg_id: int, *, high_rate: bool = True, missing_leads: str = "error",
             min_seconds: float = 1.0) -> ECGRecord:
        """The record `ecg_id` (the 500 Hz one by default; the 100 Hz one when only that is
        present) with its report and verbalised SCP codes, at the rate it was stored."""
        if ecg_id not in self.rows:
            raise RecordError(f"{self.root}/{DATABASE_CSV}: no row with ecg_id {ecg_id}")
        row = self.rows[ecg_id]
        base = self.record_path(ecg_id, high_rate)
        other = self.record_path(ecg_id, not high_rate)
        if not os.path.exists(base + ".hea") and row.filename_lr and os.path.exists(other + ".hea"):
            base = other
        signal, names, fs, _ = read_wfdb_signal(base)
        return make_record(signal, names, fs, path=base + ".hea", record_id=f"ptbxl_{ecg_id}",
                           missing_leads=missing_leads, min_seconds=min_seconds,
                           patient_id=row.patient_id, age=row.age, sex=row.sex,
                           report=row.report or ", ".join(row.labels), labels=row.labels)
