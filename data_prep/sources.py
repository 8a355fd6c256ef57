"""What data_prep can read: each source lists its work items (cheap, in the parent process) and
loads one item into (ECGRecord, conversation or None) in a worker. Loading raises RecordError."""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any

import numpy as np

from data_prep.arguments import SOURCES
from uniecg_jax.data import bundled_samples_dir, conversations, ptbxl_rows_near, with_ptbxl_metadata
from uniecg_jax.data.measure import LEAD_II, ecg_rhythm
from uniecg_jax.data.readers.cinc import read_cinc_record
from uniecg_jax.data.readers.grounding import entry_key, iter_grounding_file
from uniecg_jax.data.readers.mimic import MimicDataset, clean_measurements
from uniecg_jax.data.readers.ptbxl import PTBXLDataset
from uniecg_jax.data.synthetic import generate_one
from uniecg_jax.errors import RecordError, UniECGError


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One record to prepare. key: unique, stable id; payload: what `load_item` needs."""

    key: str
    patient_id: str
    payload: Any


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    source: str
    root: str = ""
    missing_leads: str = "error"
    num_records: int = 100          # synthetic only
    seed: int = 0                   # synthetic only
    ecg_root: str | None = None     # grounding: base folder of relative `ecg` paths
    min_seconds: float = 1.0        # shorter records are skipped
    build_conversations: bool = True


# Measurement key of the heart rate found by QRS detection (lead II) for records whose source gives
# none; the diffusion pipeline conditions on it.
QRS_HEART_RATE = "qrs_heart_rate"

_DATASETS: dict[tuple[str, str], Any] = {}


def _dataset(options: SourceOptions):
    """The parsed index of a MIMIC/PTB-XL root, built once per process (inherited on fork)."""
    key = (options.source, options.root)
    if key not in _DATASETS:
        if options.source == "mimic":
            _DATASETS[key] = MimicDataset(options.root)
        else:
            _DATASETS[key] = PTBXLDataset(options.root)
    return _DATASETS[key]


def _mimic_patient_from_path(path: str) -> str | None:
    match = re.search(r"/p(\d{8})/", path.replace(os.sep, "/"))
    return match.group(1) if match else None


def list_items(options: SourceOptions) -> tuple[list[WorkItem], list[dict]]:
    """(work items sorted by key, skipped entries found while listing: {"record", "reason"})."""
    source, root = options.source, options.root
    skipped: list[dict] = []
    if source == "synthetic":
        rng = np.random.default_rng(options.seed)
        rates = rng.uniform(45, 125, size=options.num_records).round(1)
        ages, sexes = rng.integers(20, 90, options.num_records), rng.choice(["M", "F"],
                                                                             options.num_records)
        items = [WorkItem(f"synthetic_{options.seed}_{i:07d}", f"synthetic_{options.seed}_{i}",
                          (float(rates[i]), int(ages[i]), str(sexes[i]), i))
                 for i in range(options.num_records)]
    elif source == "cinc":
        if root in ("", "bundled"):
            root = str(bundled_samples_dir())
        headers = sorted(glob.glob(os.path.join(root, "**", "*.hea"), recursive=True))
        if not headers:
            raise UniECGError(f"{root}: no WFDB headers (*.hea) found for source 'cinc'")
        rows = ptbxl_rows_near(root)
        items = []
        for header in headers:
            name = os.path.basename(header[:-4])
            patient = name
            if name.startswith("HR") and name[2:].isdigit() and int(name[2:]) in rows:
                patient = f"ptbxl_{rows[int(name[2:])].patient_id}"
            items.append(WorkItem(os.path.relpath(header[:-4], root), patient,
                                  (header[:-4], root)))
    elif source == "ptbxl":
        dataset = _dataset(options)
        items = [WorkItem(f"ptbxl_{i:05d}", f"ptbxl_{dataset.rows[i].patient_id or i}", i)
                 for i in dataset.ecg_ids()]
    elif source == "mimic":
        dataset = _dataset(options)
        items = [WorkItem(f"mimic_{s}", f"mimic_{dataset.patient_id(s)}", s)
                 for s in dataset.study_ids()]
    elif source == "grounding":
        files = [root] if os.path.isfile(root) else sorted(
            glob.glob(os.path.join(root, "*.json")) + glob.glob(os.path.join(root, "*.jsonl")))
        if not files:
            raise UniECGError(f"{root}: no .json/.jsonl conversation files")
        items = []
        for path in files:
            ecg_root = options.ecg_root or os.path.dirname(os.path.abspath(path))
            for index, sample in enumerate(iter_grounding_file(path, ecg_root=ecg_root)):
                key = entry_key(path, index)
                if isinstance(sample, RecordError):
                    skipped.append({"record": key, "reason": str(sample)})
                    continue
                patient = _mimic_patient_from_path(sample.ecg_path) or sample.sample_id
                items.append(WorkItem(key, f"mimic_{patient}", sample))
    else:
        raise UniECGError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    return sorted(items, key=lambda item: item.key), skipped


def load_item(options: SourceOptions, item: WorkItem):
    """-> (ECGRecord, conversation [(role, text)] or None). Raises RecordError for a bad record."""
    source, conversation = options.source, None
    if source == "synthetic":
        rate, age, sex, index = item.payload
        record = generate_one(rate, seed=options.seed * 100003 + index, record_id=item.key,
                              age=float(age), sex=sex)
    elif source == "cinc":
        path, root = item.payload
        record = with_ptbxl_metadata(read_cinc_record(path, missing_leads=options.missing_leads,
                                                      min_seconds=options.min_seconds),
                                     ptbxl_rows_near(root))
    elif source in ("ptbxl", "mimic"):
        record = _dataset(options).read(item.payload, missing_leads=options.missing_leads,
                                        min_seconds=options.min_seconds)
    else:  # grounding
        sample = item.payload
        record = read_cinc_record(sample.ecg_path, missing_leads=options.missing_leads,
                                  min_seconds=options.min_seconds)
        report = sample.report or record.report
        measurements = {**record.measurements, **clean_measurements(sample.machine_measurements)}
        rr = measurements.get("rr_interval")
        record = dataclasses.replace(record, record_id=f"{sample.sample_id}", report=report,
                            measurements=measurements,
                            heart_rate=record.heart_rate or (60000.0 / rr if rr else None))
        conversation = list(sample.turns)
    record = dataclasses.replace(record, patient_id=item.patient_id)
    rhythm_ii = None
    if record.heart_rate is None:  # measured once here so pipelines need no QRS detection
        # `with_measured_rhythm`'s rule, kept at hand: the conversation's lead-II findings reuse
        # it instead of detecting the same peaks again (QRS detection is most of a record's cost).
        # The detected rate goes to measurements (heart_rate stays the source's: unknown).
        measured = ecg_rhythm(record.signal, record.fs)
        record = dataclasses.replace(record, r_peaks=tuple(float(t) for t in
                                                           measured.r_peaks / record.fs))
        if np.isfinite(measured.heart_rate_bpm):
            record = dataclasses.replace(record, measurements={
                **record.measurements, QRS_HEART_RATE: round(float(measured.heart_rate_bpm), 2)})
        rhythm_ii = measured if measured.lead_index == LEAD_II else None
    if conversation is None and options.build_conversations:
        conversation = conversations.build_conversation(record, rhythm_ii=rhythm_ii)
    return record, conversation

