"""The stored example: one ECGRecord (+ its text embedding and conversation) as msgpack bytes, the
unit written to ArrayRecord shards by data_prep and read by the grain pipelines."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from array_record.python.array_record_module import ArrayRecordReader
import msgpack
import numpy as np

from uniecg_jax.data.record import NUM_LEADS, ECGRecord
from uniecg_jax.data.splits import SPLITS
from uniecg_jax.errors import UniECGError

FORMAT_VERSION = 1


def encode_example(record: ECGRecord, text_embedding: np.ndarray | None = None,
                   conversation: Sequence[tuple[str, str]] | None = None) -> bytes:
    """ECGRecord (+ [D] float32 embedding, + [(role, text)] turns) -> msgpack bytes."""
    signal = np.ascontiguousarray(record.signal, dtype=np.float32)
    payload = dict(
        version=FORMAT_VERSION, record_id=record.record_id, patient_id=record.patient_id,
        source_path=record.source_path, fs=float(record.fs), num_samples=int(signal.shape[1]),
        signal=signal.tobytes(), lead_mask=np.asarray(record.lead_mask, bool).tobytes(),
        nan_count=int(record.nan_count), age=record.age, sex=record.sex,
        heart_rate=record.heart_rate, report=record.report, labels=list(record.labels),
        measurements={k: float(v) for k, v in record.measurements.items()},
        r_peaks=None if record.r_peaks is None else [float(t) for t in record.r_peaks],
        text_embedding=None if text_embedding is None
        else np.asarray(text_embedding, np.float32).tobytes(),
        conversation=[list(turn) for turn in conversation] if conversation else None)
    return msgpack.packb(payload, use_bin_type=True)


def decode_example(data: bytes) -> dict[str, Any]:
    """msgpack bytes -> dict with `signal` [12, T] float32, `lead_mask` [12] bool,
    `text_embedding` [D] float32 or None, `conversation` [(role, text)] or None, and metadata."""
    example = msgpack.unpackb(data, raw=False)
    example["signal"] = np.frombuffer(example["signal"], np.float32).reshape(
        NUM_LEADS, example["num_samples"])
    example["lead_mask"] = np.frombuffer(example["lead_mask"], bool)
    if example.get("text_embedding") is not None:
        example["text_embedding"] = np.frombuffer(example["text_embedding"], np.float32)
    if example.get("conversation"):
        example["conversation"] = [tuple(turn) for turn in example["conversation"]]
    return example


def example_to_record(example: dict[str, Any]) -> ECGRecord:
    """A decoded example back to the ECGRecord it was made from."""
    return ECGRecord(signal=example["signal"], fs=example["fs"], record_id=example["record_id"],
                     lead_mask=example["lead_mask"], nan_count=example["nan_count"],
                     source_path=example["source_path"], patient_id=example["patient_id"],
                     age=example["age"], sex=example["sex"], heart_rate=example["heart_rate"],
                     report=example["report"], labels=tuple(example["labels"]),
                     measurements=example["measurements"],
                     r_peaks=None if example.get("r_peaks") is None else tuple(example["r_peaks"]))


def read_summary(prep_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(os.fspath(prep_dir), "summary.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UniECGError(f"{path}: not a finished data_prep output ({e})") from None


def shard_paths(prep_dir: str | os.PathLike, split: str) -> list[str]:
    """The ArrayRecord shard files of one split of a data_prep output, in order."""
    if split not in SPLITS:
        raise UniECGError(f"unknown split {split!r}; choose from {SPLITS}")
    summary = read_summary(prep_dir)
    return [os.path.join(os.fspath(prep_dir), shard["file"]) for shard in summary["shards"]
            if shard["split"] == split and shard["num_records"] > 0]


def read_shards(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Every example of the given shards, decoded (for tests and small data)."""
    examples = []
    for path in paths:
        reader = ArrayRecordReader(path)
        try:
            examples += [decode_example(b) for b in reader.read_all()]
        finally:
            reader.close()
    return examples
