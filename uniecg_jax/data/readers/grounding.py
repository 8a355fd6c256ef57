"""ECG-Grounding / ECGInstruct LLaVA-style conversation files (JSON list or JSONL):
`{"id", "ecg": "<WFDB path>", "image"?, "conversations": [{"from": "human", "value": "<image>\n..."},
{"from": "gpt", "value": ...}], "machine_measurements"?, "report"?}`."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from uniecg_jax.errors import RecordError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class GroundingSample:
    """One conversation about one ECG. turns: ((role, text), ...) with role "user"/"assistant"."""

    sample_id: str
    ecg_path: str
    turns: tuple[tuple[str, str], ...]
    report: str = ""
    machine_measurements: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_sample(item: Any, *, where: str, ecg_root: str | None = None) -> GroundingSample:
    """One JSON object -> GroundingSample; `where` ("file:line") names it in errors."""
    if not isinstance(item, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(item).__name__}")
    ecg = item.get("ecg")
    if not isinstance(ecg, str) or not ecg.strip():
        raise RecordError(f"{where}: conversation {item.get('id', '?')!r} has no `ecg` path")
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(f"{where}: `conversations` missing or empty")
    turns = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(
                turn.get("value"), str):
            raise RecordError(f"{where}: conversations[{index}] must be {{'from': human|gpt, "
                              f"'value': str}}, got {turn!r:.80}")
        turns.append((ROLES[turn["from"]], turn["value"]))
    if turns[0][0] != "user" or not any(role == "assistant" for role, _ in turns):
        raise RecordError(f"{where}: a conversation must start with a human turn and contain a "
                          "gpt answer")
    path = ecg.strip()
    if ecg_root and not os.path.isabs(path):
        path = os.path.join(ecg_root, path)
    measurements = item.get("machine_measurements") or {}
    return GroundingSample(sample_id=str(item.get("id", os.path.basename(path))), ecg_path=path,
                           turns=tuple(turns), report=str(item.get("report") or ""),
                           machine_measurements=dict(measurements)
                           if isinstance(measurements, dict) else {})


def iter_grounding_file(path: str | os.PathLike, *, ecg_root: str | None = None
                        ) -> Iterator[GroundingSample | RecordError]:
    """Yields each sample of a .json (list) or .jsonl file; a bad entry yields its RecordError
    instead (so callers can skip-and-log while keeping every good one)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                yield RecordError(f"{where}: malformed JSON line ({e.msg})")
                continue
            try:
                yield parse_sample(item, where=where, ecg_root=ecg_root)
            except RecordError as e:
                yield e
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(items, list):
        raise RecordError(f"{path}: expected a JSON list of conversations")
    for index, item in enumerate(items):
        try:
            yield parse_sample(item, where=f"{path}[{index}]", ecg_root=ecg_root)
        except RecordError as e:
            yield e


def read_grounding_file(path: str | os.PathLike, *, ecg_root: str | None = None
                        ) -> list[GroundingSample]:
    """All samples of a file; the first bad entry raises its RecordError."""
    samples = []
    for sample in iter_grounding_file(path, ecg_root=ecg_root):
        if isinstance(sample, RecordError):
            raise sample
        samples.append(sample)
    return samples
