"""Text templates that turn a report into what the frozen text encoder reads.

`report_text(report, labels, template)` is the one entry point (training, `uniecg prep
--prompt-template`, generation): "plain" keeps the report, "diffusets" rewrites it as DiffuSETS does.
"""
from __future__ import annotations

from typing import Sequence

PROMPT_TEMPLATES = ("plain", "diffusets")
_ORDINALS = ("1st", "2nd", "3rd")


def diffusets_prompt(report: str) -> str:
    """DiffuSETS's rewrite of a `|`-joined report, character for character as `prompt_propcess` in
    `utils/text_to_emb.py` of PKUDigitalHealth/DiffuSETS (commit b610a00201d02d433a95f0d31eaba059313f7b04):

        "a|b" -> "Most importantly, the 1st diagnosis is {a}.As a supplementary condition, the 2nd
        diagnosis is {b}."

    Parts are split on `|` only and kept verbatim inside braces (empty parts too, a trailing empty
    one dropped); sentences are joined with no space; ordinals 1st, 2nd, 3rd, then 4th, 5th, ...
    """
    parts = report.split("|")
    if parts[-1] == "":
        parts = parts[:-1]
    sentences = []
    for index, part in enumerate(parts):
        ordinal = _ORDINALS[index] if index < len(_ORDINALS) else f"{index + 1}th"
        opening = "Most importantly, the" if index == 0 else "As a supplementary condition, the"
        sentences.append(f"{opening} {ordinal} diagnosis is {{{part}}}.")
    return "".join(sentences)


def report_text(report: str, labels: Sequence[str] = (), template: str = "plain") -> str:
    """The text fed to the text encoder: the report as is ("plain"), or DiffuSETS' template
    ("diffusets") over the labels joined with `|` (MIMIC-IV-ECG report lines, as DiffuSETS joins
    them), else over the report itself."""
    if template == "plain":
        return report
    if template == "diffusets":
        return diffusets_prompt("|".join(labels) if labels else report)
    raise ValueError(f"unknown prompt template {template!r}; use one of {PROMPT_TEMPLATES}")
