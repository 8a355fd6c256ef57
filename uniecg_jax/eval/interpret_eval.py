"""Sharded, resumable evaluation of ECG interpretation (`uniecg eval interpret`).

Every host takes the records whose index in the sorted record list is `process_index` modulo
`process_count` (no manual splitting of files); within a host, each batch is sharded over the local
devices. Each host appends to its own part file `OUT.part-{i}-of-{n}` and flushes after every batch,
so a killed job resumes where it stopped (records already in the part file are skipped, a torn last
line is dropped; `eval.sharded_job`, shared with `eval generate`). When every part is complete, `merge` writes OUT (one line per record, sorted by
record id, each record exactly once) and `OUT.metrics.json` with the judge-free metrics of the model
and of the trivial baseline (most common statement, mean heart rate).

With an image tower the job's items are (record, input kind) pairs, record-major, so a batch mixes
kinds in one compiled program (`inference.interpret.ModelInputs`): "signal" (the ECG alone),
"image" (the page rendered from it by the training renderer, without print distortions, alone)
and "both"; rows are keyed `RECORD|KIND` and carry `kind`, and the metrics gain `by_kind` (the
model's metrics per kind; `model` is the "both" kind, what `uniecg interpret --ecg` serves).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from uniecg_jax.data import read_record
from uniecg_jax.data.bundled import bundled_split
from uniecg_jax.data.conversations import measure_findings
from uniecg_jax.data.examples import example_to_record, read_shards, shard_paths
from uniecg_jax.errors import UniECGError
from uniecg_jax.eval import judge, report_metrics, sharded_job
from uniecg_jax.eval.sharded_job import part_path, read_part
from uniecg_jax.inference.interpret import INPUT_KINDS

SIGNAL_ONLY = ("signal",)   # the kinds of a model without an image tower (rows keyed by record)


@dataclasses.dataclass(frozen=True)
class EvalItem:
    record_id: str
    ecg: np.ndarray                    # [12, 5000] mV at 500 Hz
    reference: report_metrics.Reference
    reference_text: str


def reference_for(record) -> report_metrics.Reference:
    """Statements from the record's labels (SNOMED / SCP names), heart rate from the record's known
    rate (synthetic) or by QRS detection on lead II."""
    heart_rate = record.heart_rate
    if heart_rate is None:
        findings = measure_findings(record)
        heart_rate = findings.heart_rate_bpm if findings.beats >= 2 else None
    vocab = report_metrics.StatementVocabulary.default()
    labels = [label for label in (record.labels or ()) if vocab.lookup(label) is not None]
    measurements = {"heart_rate": float(heart_rate)} if heart_rate else {}
    return report_metrics.Reference(text=record.report or "", labels=labels or None,
                                    measurements=measurements)


def items_from_records(records: Iterable) -> list[EvalItem]:
    items = [EvalItem(r.record_id, r.to_encoder_input(), reference_for(r), r.report or "")
             for r in records]
    return sorted(items, key=lambda item: item.record_id)


def load_eval_records(data: str, config=None) -> list:
    """`bundled` (the held-out split the checkpoint's config defines), a `uniecg prep` folder (its
    test split), or a folder of WFDB records (every `.hea`)."""
    if data == "bundled":
        data_cfg = config.data
        return bundled_split(int(data_cfg.holdout_every), int(data_cfg.num_synthetic),
                             int(config.seed))["test"]
    if os.path.isfile(os.path.join(data, "summary.json")):
        return [example_to_record(e) for e in read_shards(shard_paths(data, "test"))]
    if os.path.isdir(data):
        headers = sorted(f for f in os.listdir(data) if f.endswith(".hea"))
        if not headers:
            raise UniECGError(f"{data}: no .hea records found")
        return [read_record(os.path.join(data, h[:-4])) for h in headers]
    raise UniECGError(f"{data}: expected 'bundled', a `uniecg prep` folder or a folder of WFDB records")


def eval_kinds(interpreter, kinds: Sequence[str] | None = None) -> tuple[str, ...]:
    """The input kinds to evaluate: all of `INPUT_KINDS` with an image tower (or the `kinds`
    asked for), "signal" alone without one."""
    if not interpreter.has_image_tower:
        if kinds and tuple(kinds) != SIGNAL_ONLY:
            raise UniECGError(f"input kinds {list(kinds)}: this model has no image tower "
                              "(model.vision_tower), it reads signals only")
        return SIGNAL_ONLY
    kinds = tuple(kinds or INPUT_KINDS)
    unknown = [kind for kind in kinds if kind not in INPUT_KINDS]
    if unknown or not kinds:
        raise UniECGError(f"input kinds {list(kinds)}: choose from {list(INPUT_KINDS)}")
    return tuple(kind for kind in INPUT_KINDS if kind in kinds)


def job_keys(items: Sequence[EvalItem], kinds: Sequence[str]) -> list[str]:
    """The job's row keys, record-major: the record id (kinds == ("signal",)), else `ID|KIND`."""
    if tuple(kinds) == SIGNAL_ONLY:
        return [item.record_id for item in items]
    return [f"{item.record_id}|{kind}" for item in items for kind in kinds]


def run_shard(interpreter, items: Sequence[EvalItem], out: str, *, process_index: int,
              process_count: int, batch_size: int = 8, max_new_tokens: int | None = None,
              prompt: str | None = None, progress: bool = True,
              kinds: Sequence[str] | None = None) -> str:
    """Interprets this host's share of the (record, kind) items (round robin) into its part file
    (`sharded_job.run_shard`); returns the part path. kinds: see `eval_kinds`."""
    kinds = eval_kinds(interpreter, kinds)
    devices = jax.local_device_count()
    batch_size = max(devices, (batch_size // devices) * devices)
    vocab = report_metrics.StatementVocabulary.default()

    def interpret_batch(indices: list[int]) -> list[dict]:
        jobs = [(items[i // len(kinds)], kinds[i % len(kinds)]) for i in indices]
        pages: dict[str, np.ndarray] = {}

        def page(item):
            if item.record_id not in pages:
                pages[item.record_id] = interpreter.rendered_pixels(item.ecg)
            return pages[item.record_id]

        ecgs = [item.ecg if kind != "image" else None for item, kind in jobs]
        images = ([page(item) if kind != "signal" else None for item, kind in jobs]
                  if interpreter.has_image_tower else None)
        reports = interpreter.interpret(ecgs, prompt, images=images, render_missing_images=False,
                                        max_new_tokens=max_new_tokens, batch_multiple=devices)
        rows = []
        for (item, kind), report in zip(jobs, reports):
            row = dict(generated=report, reference=item.reference_text,
                       reference_labels=list(item.reference.labels or []),
                       reference_measurements=dict(item.reference.measurements or {}),
                       scores=report_metrics.score_record(report, item.reference, vocab))
            rows.append(row if kinds == SIGNAL_ONLY else dict(row, record=item.record_id,
                                                              kind=kind))
        return rows

    settings = dict(max_new_tokens=max_new_tokens, prompt=prompt)
    if kinds != SIGNAL_ONLY:
        settings["kinds"] = list(kinds)
    return sharded_job.run_shard(job_keys(items, kinds), interpret_batch, out,
                                 process_index=process_index, process_count=process_count,
                                 batch_size=batch_size, desc="eval", progress=progress,
                                 settings=settings)


def job_kinds(out: str, process_count: int) -> tuple[str, ...]:
    """The input kinds a job evaluated, from its first part's stored settings."""
    settings_path = part_path(out, 0, process_count) + ".job.json"
    if not os.path.exists(settings_path):
        return SIGNAL_ONLY
    with open(settings_path) as f:
        return tuple(json.load(f).get("kinds", SIGNAL_ONLY))


def merge(out: str, process_count: int, items: Sequence[EvalItem],
          kinds: Sequence[str] | None = None) -> dict | None:
    """Writes OUT and OUT.metrics.json once every part is done; returns the metrics (else None).
    kinds: those `run_shard` evaluated (default: read from the job's settings); with more than
    "signal" the metrics hold `by_kind` and `model` is the "both" kind (else the last one)."""
    kinds = tuple(kinds) if kinds is not None else job_kinds(out, process_count)
    items = sorted(items, key=lambda i: i.record_id)
    ordered = sharded_job.read_parts(out, process_count, job_keys(items, kinds))
    if ordered is None:
        return None
    with open(out, "w") as f:
        for row in ordered:
            f.write(json.dumps(row) + "\n")
    references = [item.reference for item in items]
    vocab = report_metrics.StatementVocabulary.default()
    baseline = report_metrics.evaluate_reports(
        report_metrics.baseline_reports(references, vocab), references, vocab)
    metrics = {"baseline": baseline,
               "baseline_text": report_metrics.baseline_reports(references, vocab)[0]}
    if tuple(kinds) == SIGNAL_ONLY:
        metrics["model"] = report_metrics.aggregate([row["scores"] for row in ordered])
    else:
        metrics["by_kind"] = {kind: report_metrics.aggregate(
            [row["scores"] for row in ordered if row["kind"] == kind]) for kind in kinds}
        metrics["model"] = metrics["by_kind"]["both" if "both" in kinds else kinds[-1]]
    with open(out + ".metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    """A short human-readable comparison of model (per input kind) vs baseline."""
    rows = ([(f"model ({kind})", m) for kind, m in metrics["by_kind"].items()]
            if "by_kind" in metrics else [("model", metrics["model"])])
    lines = []
    for name, m in rows + [("baseline", metrics["baseline"])]:
        hr = m["measurements"]["heart_rate"]
        hr_text = (f"HR MAE {hr['mae']:.1f} bpm (stated in {hr['stated_fraction']:.0%})"
                   if hr["mae"] is not None else "HR not stated")
        lines.append(f"{name:>14}: diagnosis F1 micro {m['diagnosis']['micro']['f1']:.3f} "
                     f"macro {m['diagnosis']['macro']['f1']:.3f}; {hr_text}; "
                     f"lead coverage {m['leads']['coverage']:.2f}")
    return lines


def judge_results(out: str, judge_config, progress: bool = True) -> dict:
    """Scores every row of a merged OUT with the GEM-style judge (`uniecg_jax.eval.judge`).

    Resumable like generation: judged rows go to OUT.judge.jsonl as they finish and are skipped on
    a rerun. Writes and returns OUT.judge.json: the mean of each criterion, with the judge model and
    the aggregation named.
    """
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    judged_path = out + ".judge.jsonl"
    judged = read_part(judged_path)
    with open(judged_path, "a") as f:
        for row in tqdm(rows, disable=not progress, desc="judge"):
            if row["record_id"] in judged:
                continue
            reference = row["reference"] or ", ".join(row["reference_labels"])
            result = judge.judge_report(row["generated"], reference, judge_config)
            result = {"record_id": row["record_id"], **result}
            f.write(json.dumps(result) + "\n")
            f.flush()
            judged[row["record_id"]] = result
    summary = judge.aggregate_judge_scores([judged[row["record_id"]] for row in rows],
                                           judge_config.model)
    with open(out + ".judge.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary
