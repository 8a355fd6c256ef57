"""Tiny on-disk datasets in the real layouts (MIMIC-IV-ECG, PTB-XL, ECG-Grounding), written with
wfdb.wrsamp from real bundled signals, for the data-layer tests."""
from __future__ import annotations

import json
import os

import numpy as np

from uniecg_jax.data import LEADS, load_bundled_records

MIMIC_ORDER = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


def write_wfdb(directory: str, name: str, signal_by_lead: dict[str, np.ndarray], fs: float = 500,
               comments: list[str] | None = None, order=LEADS) -> str:
    """Writes `name.hea/.dat` (format 16, mV) with channels in `order`; returns the path base."""
    import wfdb

    os.makedirs(directory, exist_ok=True)
    signal = np.stack([signal_by_lead[lead] for lead in order], axis=1).astype(np.float64)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(order), sig_name=list(order), p_signal=signal,
                fmt=["16"] * len(order), adc_gain=[1000.0] * len(order),
                baseline=[0] * len(order), comments=comments or [], write_dir=directory)
    return os.path.join(directory, name)


def write_mimic_root(root: str, records=None, n: int = 4) -> list:
    """A MIMIC-IV-ECG layout with `n` bundled records stored in MIMIC lead order (aVF before aVL),
    two studies per patient; the third study's measurements hold sentinels (29999)."""
    import pandas as pd

    records = records or load_bundled_records()[:n]
    list_rows, measurement_rows = [], []
    for i, record in enumerate(records):
        subject, study = 10000000 + i // 2, 40000000 + i
        relative = f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"
        write_wfdb(os.path.join(root, os.path.dirname(relative)), str(study),
                   dict(zip(LEADS, record.signal)), order=MIMIC_ORDER)
        list_rows.append(dict(subject_id=subject, study_id=study, file_name=str(study),
                              ecg_time="2180-07-23 08:44:00", path=relative))
        row = dict(subject_id=subject, study_id=study, cart_id=1, ecg_time="2180-07-23 08:44:00")
        for j in range(18):
            row[f"report_{j}"] = None
        row["report_0"] = "Sinus rhythm"
        row["report_1"] = f"Study {i}."
        row.update(bandwidth="0.005-150 Hz", filtering="60 Hz notch Baseline filter",
                   rr_interval=29999 if i == 2 else 800, p_onset=40, p_end=29999, qrs_onset=200,
                   qrs_end=290, t_end=600, p_axis=60, qrs_axis=29999 if i == 2 else -10,
                   t_axis=45)
        measurement_rows.append(row)
    pd.DataFrame(list_rows).to_csv(os.path.join(root, "record_list.csv"), index=False)
    pd.DataFrame(measurement_rows).to_csv(os.path.join(root, "machine_measurements.csv"),
                                          index=False)
    return records


def write_ptbxl_root(root: str, n: int = 3) -> list:
    """A PTB-XL layout (records500/...) holding the bundled PTB-XL records HR06000.. and their rows."""
    import shutil

    from uniecg_jax.data import bundled_samples_dir

    import pandas as pd

    samples = bundled_samples_dir()
    table = pd.read_csv(samples / "ptbxl_database_ecg6000-6009.csv").head(n)
    records = {r.record_id: r for r in load_bundled_records()}
    out = []
    for row in table.itertuples(index=False):
        record = records[f"HR0{row.ecg_id}"]
        write_wfdb(os.path.join(root, os.path.dirname(row.filename_hr)),
                   os.path.basename(row.filename_hr), dict(zip(LEADS, record.signal)))
        out.append(record)
    table.to_csv(os.path.join(root, "ptbxl_database.csv"), index=False)
    shutil.copy(samples / "scp_statements.csv", os.path.join(root, "scp_statements.csv"))
    return out


def write_grounding_file(path: str, ecg_paths: list[str], jsonl: bool = True) -> None:
    """An ECG-Grounding-style file with one conversation per ECG path."""
    items = [{"id": f"g{i}", "ecg": ecg, "image": f"img{i}.png",
              "conversations": [
                  {"from": "human", "value": "<image>\nInterpret this ECG."},
                  {"from": "gpt", "value": f"Answer {i}: sinus rhythm with normal axis."},
                  {"from": "human", "value": "Is the rate normal?"},
                  {"from": "gpt", "value": "Yes."}],
              "report": "sinus rhythm", "machine_measurements": {"rr_interval": 800}}
             for i, ecg in enumerate(ecg_paths)]
    with open(path, "w") as f:
        if jsonl:
            f.write("\n".join(json.dumps(item) for item in items) + "\n")
        else:
            json.dump(items, f)
