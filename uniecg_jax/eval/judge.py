"""GEM-style LLM-judge scorer for ECG interpretations (any OpenAI-compatible chat endpoint).

The judge compares a generated interpretation with a reference (clinician / ground-truth) one and
scores eight criteria (GEM's): DiagnosisAccuracy, AnalysisCompleteness, AnalysisRelevance,
LeadAssessmentCoverage, LeadAssessmentAccuracy, ECGFeatureGrounding, EvidenceBasedReasoning,
ClinicalDiagnosticFidelity. Per-record aggregation (GEM's convention, stated with every result):
  DiagnosisAccuracy        100 x fraction of listed diagnoses scored > 0
  AnalysisCompleteness     sum of per-feature points (raw count)
  AnalysisRelevance        sum of per-point scores (raw)
  LeadAssessmentCoverage   min(sum, 12) / 12 x 100
  LeadAssessmentAccuracy   min(sum / 24 x 100, 100)     (2 points per lead x 12 leads)
  ECGFeatureGrounding, EvidenceBasedReasoning, ClinicalDiagnosticFidelity: the 0-100 score
  average                  mean of the last three
Over a test set every field is the mean over records.

Config (`eval.judge.*`): model, base_url (e.g. https://api.openai.com/v1), api_key_env (name of the
environment variable holding the key; empty = no Authorization header), temperature, timeout_s,
max_retries. Requests are plain `urllib` POSTs to `{base_url}/chat/completions`.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Sequence

from uniecg_jax.errors import UniECGError
from uniecg_jax.models.schema import ConfigSchema

METRICS = ("DiagnosisAccuracy", "AnalysisCompleteness", "AnalysisRelevance",
           "LeadAssessmentCoverage", "LeadAssessmentAccuracy", "ECGFeatureGrounding",
           "EvidenceBasedReasoning", "ClinicalDiagnosticFidelity")
AVERAGED = ("ECGFeatureGrounding", "EvidenceBasedReasoning", "ClinicalDiagnosticFidelity")
# Names judges (and GEM's first prompt) also use for the same criteria.
_ALIASES = {"GroundedECGUnderstanding": "ECGFeatureGrounding",
            "RealisticDiagnosticProcess": "ClinicalDiagnosticFidelity"}


class JudgeError(UniECGError):
    """The judge endpoint failed or its answer cannot be read as the expected JSON."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig(ConfigSchema):
    """The schema of `eval.judge` (loaded strictly by `JudgeConfig.from_config`)."""
    config_group = "eval.judge"
    model: str = "gpt-4o-2024-08-06"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    timeout_s: float = 120.0
    max_retries: int = 2


PROMPT = """You are an experienced cardiologist grading an automatically written interpretation of a \
12-lead ECG. Compare the GENERATED interpretation with the REFERENCE interpretation written for the \
same ECG, and score it on the eight criteria below. Be strict and objective; judge only what is \
written.

1. DiagnosisAccuracy - list each diagnosis the generated text makes. Score each 2 if it is correct \
and backed by the ECG findings it cites, 1 if correct but weakly supported, 0 if wrong or vague.
2. AnalysisCompleteness - for each key ECG component (rhythm, rate, PR interval, QRS duration, QT/QTc, \
axis, P waves, ST segments, T waves, lead-specific findings) score 1 if it is correctly addressed, \
0 if it is missing or wrong.
3. AnalysisRelevance - for each explanatory point (a feature or a lead), score 2 if it clearly \
supports the diagnosis with ECG evidence, 1 if relevant but not fully justified, 0 if unrelated or \
misleading.
4. LeadAssessmentCoverage - for each of the 12 leads, score 1 if it is adequately assessed, 0 if \
omitted.
5. LeadAssessmentAccuracy - for each assessed lead, score 2 if its findings (P, QRS, ST, T, \
amplitudes) agree with the reference and standard interpretation, 1 if roughly right with small \
errors, 0 if wrong.
6. ECGFeatureGrounding - one score from 0 to 100: 100 if concrete waveform features (amplitudes, \
intervals, morphology) are cited throughout and tied to every diagnosis, 80 if cited and tied to the \
diagnoses, 50 if only some are cited, 0 if the text stays generic.
7. EvidenceBasedReasoning - one score from 0 to 100: 100 if the findings lead step by step to the \
diagnosis with complete justification, 80 if the reasoning is clear, 50 if partial, 0 if absent.
8. ClinicalDiagnosticFidelity - one score from 0 to 100: 100 if the interpretation follows a \
structured clinical reading and weighs all relevant factors, 80 if structured, 50 if partly, 0 if not.

GENERATED interpretation:
{generated}

REFERENCE interpretation:
{reference}

Answer with one JSON object only, no other text. Each key is a criterion name; each value is a list \
of objects {{"Score": <number>, "Explanation": "<short reason>"}}, one per item scored (criteria 6-8 \
have exactly one item):
{{"DiagnosisAccuracy": [...], "AnalysisCompleteness": [...], "AnalysisRelevance": [...], \
"LeadAssessmentCoverage": [...], "LeadAssessmentAccuracy": [...], "ECGFeatureGrounding": [...], \
"EvidenceBasedReasoning": [...], "ClinicalDiagnosticFidelity": [...]}}"""


def build_prompt(generated: str, reference: str) -> str:
    return PROMPT.format(generated=generated.strip(), reference=reference.strip())


def build_request(config: JudgeConfig, prompt: str,
                  environ: Mapping[str, str] | None = None) -> urllib.request.Request:
    """The POST to `{base_url}/chat/completions` (OpenAI chat format, JSON body)."""
    environ = os.environ if environ is None else environ
    headers = {"Content-Type": "application/json"}
    if config.api_key_env:
        key = environ.get(config.api_key_env)
        if not key:
            raise JudgeError(f"judge API key: environment variable {config.api_key_env!r} is not set "
                             f"(set it, or eval.judge.api_key_env='' for an endpoint without keys)")
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": config.model, "temperature": config.temperature,
            "messages": [{"role": "user", "content": prompt}]}
    return urllib.request.Request(config.base_url.rstrip("/") + "/chat/completions",
                                  data=json.dumps(body).encode("utf-8"), headers=headers,
                                  method="POST")


def call_judge(config: JudgeConfig, prompt: str, environ: Mapping[str, str] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> str:
    """Sends `prompt`; returns the assistant message text. Retries 429/5xx/network errors
    `max_retries` times with exponential backoff; anything else raises JudgeError."""
    request = build_request(config, prompt, environ)
    url = request.full_url
    for attempt in range(config.max_retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
            break
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            if (e.code == 429 or e.code >= 500) and attempt < config.max_retries:
                sleep(2.0 ** attempt)
                continue
            raise JudgeError(f"judge endpoint {url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt < config.max_retries:
                sleep(2.0 ** attempt)
                continue
            raise JudgeError(f"judge endpoint {url} unreachable: {e}") from None
        except json.JSONDecodeError as e:
            raise JudgeError(f"judge endpoint {url} returned non-JSON: {e}") from None
    try:
        return payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge endpoint {url}: no choices[0].message.content in "
                         f"{json.dumps(payload)[:300]}") from None


def _outer_object(text: str) -> str:
    text = re.sub(r"```(?:json)?", "", text)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise JudgeError(f"judge answer holds no JSON object: {text[:200]!r}")
    return text[start:end + 1]


def _loads_lenient(blob: str) -> Any:
    """json.loads, then common judge slips: trailing commas, "+2", // comments, Python literals."""
    attempts = [blob]
    cleaned = re.sub(r"//[^\n]*", "", blob)
    cleaned = re.sub(r",\s*([}\]])", r"\1", cleaned)
    cleaned = re.sub(r"(?<=[:\[,\s])\+(\d)", r"\1", cleaned)
    cleaned = cleaned.replace("\u201c", '"').replace("\u201d", '"')
    attempts.append(cleaned)
    for candidate in attempts:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
    try:
        return ast.literal_eval(cleaned)
    except (ValueError, SyntaxError):
        raise JudgeError(f"judge answer is not valid JSON: {blob[:200]!r}") from None


def _score(item: Any, metric: str) -> float:
    if isinstance(item, Mapping):
        for key in ("Score", "score", "points"):
            if key in item:
                item = item[key]
                break
        else:
            raise JudgeError(f"judge answer: an item of {metric} has no Score: {item!r}")
    if isinstance(item, str):
        match = re.search(r"-?\d+(?:\.\d+)?", item)
        if not match:
            raise JudgeError(f"judge answer: score {item!r} of {metric} is not a number")
        item = match.group(0)
    try:
        return float(item)
    except (TypeError, ValueError):
        raise JudgeError(f"judge answer: score {item!r} of {metric} is not a number") from None


def parse_judge_response(text: str) -> dict[str, list[float]]:
    """The judge's answer -> {metric: [item scores]} for all eight METRICS.

    Accepts code fences, text around the object, trailing commas, single quotes, "+2" scores, a bare
    number instead of a list, and GEM's older names for two criteria. Raises JudgeError naming the
    missing criterion or the unreadable part."""
    data = _loads_lenient(_outer_object(text))
    if not isinstance(data, Mapping):
        raise JudgeError(f"judge answer is not a JSON object: {text[:200]!r}")
    data = {_ALIASES.get(k, k): v for k, v in data.items()}
    missing = [m for m in METRICS if m not in data]
    if missing:
        raise JudgeError(f"judge answer lacks criteria {missing}: {text[:200]!r}")
    scores = {}
    for metric in METRICS:
        items = data[metric]
        items = items if isinstance(items, list) else [items]
        scores[metric] = [_score(item, metric) for item in items]
    return scores


def record_scores(item_scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Per-record criterion values + "average" (the aggregation in the module docstring)."""
    def total(metric: str) -> float:
        return float(sum(item_scores[metric]))

    diagnoses = item_scores["DiagnosisAccuracy"]
    out = {
        "DiagnosisAccuracy": 100.0 * sum(s > 0 for s in diagnoses) / len(diagnoses) if diagnoses
        else 0.0,
        "AnalysisCompleteness": total("AnalysisCompleteness"),
        "AnalysisRelevance": total("AnalysisRelevance"),
        "LeadAssessmentCoverage": min(total("LeadAssessmentCoverage"), 12.0) / 12.0 * 100.0,
        "LeadAssessmentAccuracy": min(total("LeadAssessmentAccuracy") / 24.0 * 100.0, 100.0),
    }
    for metric in AVERAGED:
        out[metric] = min(max(total(metric), 0.0), 100.0)
    out["average"] = sum(out[m] for m in AVERAGED) / len(AVERAGED)
    return out


def judge_report(generated: str, reference: str, config: JudgeConfig,
                 environ: Mapping[str, str] | None = None) -> dict:
    """Asks the judge about one record: {"scores": record_scores, "items": per-item scores,
    "raw": the judge's text, "judge_model": config.model}."""
    raw = call_judge(config, build_prompt(generated, reference), environ)
    items = parse_judge_response(raw)
    return {"scores": record_scores(items), "items": items, "raw": raw, "judge_model": config.model}


def aggregate_judge_scores(records: Sequence[Mapping[str, Any]], judge_model: str) -> dict:
    """Mean of every criterion (and "average") over `judge_report` results, with the judge model
    and the aggregation named, as results should always state them."""
    if not records:
        raise ValueError("no judged records to aggregate")
    keys = METRICS + ("average",)
    means = {k: sum(r["scores"][k] for r in records) / len(records) for k in keys}
    return {**means, "num_records": len(records), "judge_model": judge_model,
            "aggregation": "per-record GEM aggregation (see uniecg_jax/eval/judge.py), mean over "
                           "records; average = mean(ECGFeatureGrounding, EvidenceBasedReasoning, "
                           "ClinicalDiagnosticFidelity)"}
