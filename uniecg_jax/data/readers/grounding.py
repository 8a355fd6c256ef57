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
    for index, (item, error) in enumerate(iter_json_list(text, path=str(path))):
        where = f"{path}[{index}]"
        if error is not None:
            yield RecordError(f"{where}: {error}")
            continue
        try:
            yield parse_sample(item, where=where, ecg_root=ecg_root)
        except RecordError as e:
            yield e


def entry_key(path: str | os.PathLike, index: int) -> str:
    """The one name of entry `index` (0-based, in file order) of a conversation file, used for its
    work item and for its line in skipped.jsonl alike: `g.jsonl#0000004`."""
    return f"{os.path.basename(os.fspath(path))}#{index:07d}"


def _entry_end(text: str, start: int) -> int:
    """Index of the `,` or `]` that ends the list entry starting at `start` (depth 0, outside
    strings), or len(text) when the list never closes. Used to step over a malformed entry."""
    depth, in_string, escaped = 0, False, False
    for position in range(start, len(text)):
        char = text[position]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            if depth == 0:
                return position
            depth -= 1
        elif char == "," and depth == 0:
            return position
    return len(text)


def iter_json_list(text: str, *, path: str) -> Iterator[tuple[Any, str | None]]:
    """Decodes a JSON list entry by entry: yields (entry, None), or (None, problem) for an entry that
    is not valid JSON, then carries on with the next one (so one bad entry costs only itself); an
    unclosed list ends with one such problem. Raises RecordError when the text is not a JSON list."""
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        raise RecordError(f"{path}: expected a JSON list of conversations")
    position += 1
    while True:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position >= len(text):
            yield None, "the JSON list is not closed (file truncated?)"
            return
        if text[position] == "]":
            return
        try:
            item, end = decoder.raw_decode(text, position)
            while end < len(text) and text[end] in " \t\r\n":
                end += 1
            if end < len(text) and text[end] not in ",]":
                raise json.JSONDecodeError("expected ',' or ']' after the entry", text, end)
        except json.JSONDecodeError as e:
            end = _entry_end(text, position)
            line = text.count("\n", 0, e.pos) + 1
            unclosed = "; the list is not closed (file truncated?)" if end >= len(text) else ""
            yield None, f"malformed JSON entry at line {line} ({e.msg}){unclosed}"
            if unclosed:
                return
        else:
            yield item, None
        if end >= len(text):
            yield None, "the JSON list is not closed (file truncated?)"
            return
        position = end + 1 if text[end] == "," else end


def read_grounding_file(path: str | os.PathLike, *, ecg_root: str | None = None
                        ) -> list[GroundingSample]:
    """All samples of a file; the first bad entry raises its RecordError."""
    samples = []
    for sample in iter_grounding_file(path, ecg_root=ecg_root):
        if isinstance(sample, RecordError):
            raise sample
        samples.append(sample)
    return samples
