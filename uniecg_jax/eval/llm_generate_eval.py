"""`uniecg eval generate --via llm`: diffusion fidelity metrics on ECGs generated through the unified
model's [ECG] tokens, beside the same metrics with the true text-encoder embedding, and the cosine
similarity between predicted and true embeddings on held-out reports.

    from uniecg_jax.eval import llm_generate_eval
    metrics = llm_generate_eval.run(UnifiedModel.load(ckpt, diffusion=diff_dir), records,
                                    "out/llm_generate.json",
                                    text_encoder=get_text_encoder("minilm"), clip=clip)
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from uniecg_jax.data.chat_format import GENERATION_REQUEST, INTERPRETATION_REQUEST
from uniecg_jax.data.conversations import generation_request, record_attributes, \
    text_answered_request
from uniecg_jax.errors import UniECGError
from uniecg_jax.eval import sharded_job
from uniecg_jax.eval.generate_eval import (eval_items, generate_for_items,
                                           record_stats, set_metrics, take_items)
from uniecg_jax.inference.chat import conditions_from_attributes, regex_conditions


def cosine_similarity(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [N, D] arrays."""
    predicted, true = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
    return (predicted * true).sum(1) / (np.linalg.norm(predicted, axis=1)
                                        * np.linalg.norm(true, axis=1) + 1e-12)


def predict_embeddings(unified, reports: Sequence[str], batch_size: int = 8,
                       max_new_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Generation requests for `reports` -> (predicted condition vectors [N, D], emitted [N] bool)."""
    prompts = [GENERATION_REQUEST + report for report in reports]
    conditions, emitted = [], []
    budget = max_new_tokens or unified.model.config.num_ecg_tokens + 2
    for start in range(0, len(prompts), batch_size):
        _, condition, flags = unified.respond(prompts[start:start + batch_size],
                                              max_new_tokens=budget)
        conditions.append(condition)
        emitted.append(flags)
    return np.concatenate(conditions), np.concatenate(emitted)


def run(unified, records: Sequence, out: str, *, text_encoder, n: int = 1, steps: int = 50,
        guidance: float | None = None, seed: int = 0, clip=None, batch_size: int = 8,
        process_index: int = 0, process_count: int = 1, manual_hosts: bool = True,
        progress: bool = True) -> dict | None:
    """Runs this host's share of the records into its part file of `out` (`eval.sharded_job`:
    blocks of `batch_size` records per host, resumable), then, once every part is done, writes
    `out` (JSON) and returns the metrics dict: {"via_llm": fidelity metrics, "true_embedding":
    fidelity metrics, "embedding_cosine": {mean, min, per_record}, "emitted_rate": share of
    requests answered with all [ECG] tokens}; None while parts are missing (or on hosts other
    than 0 of a JAX multi-host job, which synchronises instead: `manual_hosts` False).
    `unified.diffusion` must be loaded."""
    if unified.diffusion is None:
        raise UniECGError("eval generate --via llm needs a diffusion model (--diffusion DIR)")
    items = eval_items(records, text_encoder)
    guidance = unified.diffusion.default_guidance if guidance is None else guidance

    def block_rows(indices: list[int]) -> list[dict]:
        block = take_items(items, indices)
        predicted, emitted = predict_embeddings(unified, block["report"], len(indices))
        cosine = cosine_similarity(predicted, block["text_embedding"])
        rows = [{"cosine": float(c), "emitted": bool(e)} for c, e in zip(cosine, emitted)]
        for name, conditions in (("via_llm", dict(block, text_embedding=predicted.astype(
                np.float32))), ("true_embedding", block)):
            generated = generate_for_items(unified.diffusion, conditions, n=n, sampler="ddim",
                                           steps=steps, guidance=guidance, seed=seed + indices[0],
                                           batch_size=len(indices), data_parallel=True)
            for row, stats in zip(rows, record_stats(generated, block, n, clip)):
                row[name] = stats
        return rows

    settings = dict(n=n, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                    clip=clip is not None)
    sharded_job.run_shard(items["record_id"], block_rows, out, process_index=process_index,
                          process_count=process_count, batch_size=batch_size, block=batch_size,
                          settings=settings, desc="eval generate --via llm", progress=progress)
    sharded_job.wait_for_hosts(process_count, manual_hosts, "eval generate --via llm: parts")
    if not sharded_job.should_merge(process_index, manual_hosts):
        return None
    rows = sharded_job.read_parts(out, process_count, items["record_id"])
    if rows is None:
        return None
    cosine = np.array([row["cosine"] for row in rows])
    metrics = {"via_llm": set_metrics([row["via_llm"] for row in rows]),
               "true_embedding": set_metrics([row["true_embedding"] for row in rows]),
               "embedding_cosine": {"mean": float(cosine.mean()), "min": float(cosine.min()),
                                    "per_record": cosine.tolist()},
               "emitted_rate": float(np.mean([row["emitted"] for row in rows])),
               "num_records": len(rows)}
    with open(out, "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    """Printable comparison lines."""
    lines = [f"[ECG] tokens emitted for {100 * metrics['emitted_rate']:.0f}% of "
             f"{metrics['num_records']} requests; cosine(predicted, true embedding) mean "
             f"{metrics['embedding_cosine']['mean']:.3f} (min {metrics['embedding_cosine']['min']:.3f})"]
    for name in ("via_llm", "true_embedding"):
        part = metrics[name]
        extra = "".join(f", {k} {part[k]:.3f}" for k in ("clip_score", "fid")
                        if isinstance(part.get(k), float))
        lines.append(f"{name}: HR MAE {part['hr_mae']:.1f} bpm ({part['hr_undetected']} "
                     f"undetected), QRS F1 vs reference {part['qrs_f1_vs_reference']:.3f}{extra}")
    return lines


ATTRIBUTES = ("heart_rate", "age", "sex")


def _shares(emitted: np.ndarray, groups: Sequence[str]) -> dict:
    """{group: (share of its rows answered with [ECG], row count)}, groups in first-seen order."""
    groups = np.asarray(groups)
    return {str(group): (float(emitted[groups == group].mean()), int((groups == group).sum()))
            for group in dict.fromkeys(groups.tolist())}


def _decision_scores(emitted: np.ndarray, is_generation: np.ndarray, kinds: Sequence[str],
                     templates: Sequence[str] | None = None) -> dict:
    """emitted / is_generation [N] bool, kinds [N] -> precision / recall of emitting [ECG] for the
    generation requests, and per kind (and per wording, `templates` [N]) the share of requests
    answered with [ECG] and their count."""
    emitted, is_generation = np.asarray(emitted, bool), np.asarray(is_generation, bool)
    true_positive = int((emitted & is_generation).sum())
    scores = {"precision": true_positive / max(int(emitted.sum()), 1),
              "recall": true_positive / max(int(is_generation.sum()), 1),
              "generation_requests": int(is_generation.sum()),
              "other_requests": int((~is_generation).sum()),
              "emitted_by_kind": _shares(emitted, kinds)}
    if templates is not None:
        scores["emitted_by_template"] = _shares(emitted, templates)
    return scores


def _attribute_error(predicted: Sequence[dict], truth: Sequence[dict], name: str) -> float:
    """MAE of heart rate / age, or the accuracy of sex, of `predicted` against `truth` (nan when
    there is no row)."""
    if name == "sex":
        hits = [p[name] == t[name] for p, t in zip(predicted, truth)]
        return float(np.mean(hits)) if hits else float("nan")
    errors = [abs(p[name] - t[name]) for p, t in zip(predicted, truth)]
    return float(np.mean(errors)) if errors else float("nan")


def _best_constant(truth: Sequence[dict], name: str) -> float:
    """The error of the best constant guess in hindsight on these rows (MAE around their median;
    sex: the majority's share): what a head that ignores the request reaches at best."""
    values = [t[name] for t in truth]
    if not values:
        return float("nan")
    if name == "sex":
        return max(values.count(v) for v in set(values)) / len(values)
    return float(np.mean(np.abs(np.asarray(values) - np.median(values))))


def _attribute_scores(predicted, baseline, truth, stated) -> dict:
    """Per attribute, on the rows where the truth is known, split by whether the request states
    it ("stated": read from the words; "implied": from the report, or the best guess): the
    attribute head's and the regex-plus-defaults baseline's MAE (sex: accuracy), the best
    constant's (`_best_constant`) and the count."""
    out = {}
    for name in ATTRIBUTES:
        out[name] = {}
        for part, said in (("stated", True), ("implied", False)):
            rows = [i for i in range(len(truth)) if truth[i][name] is not None
                    and (stated[i][name] is not None) == said]
            pick = lambda items: [items[i] for i in rows]  # noqa: E731
            out[name][part] = {"model": _attribute_error(pick(predicted), pick(truth), name),
                               "baseline": _attribute_error(pick(baseline), pick(truth), name),
                               "constant": _best_constant(pick(truth), name),
                               "requests": len(rows)}
    return out


def request_metrics(unified, records: Sequence, *, phrasing: str, seed: int = 0,
                    interpretation_ecgs: np.ndarray | None = None, batch_size: int = 64,
                    draws: int = 1, follow_up_probability: float = 0.25) -> dict:
    """How the unified model reads requests phrased as users phrase them (data.conversations).

    For each record, `draws` generation requests (`generation_request`, phrasing set `phrasing`:
    "trained" or "held_out"; each known attribute stated half the time, else implied by the
    report or unknown; a follow-up after a turn about the report with `follow_up_probability`)
    and `draws` requests answered in words (`text_answered_request`: a question about the report
    or a general question); plus, when given, interpretation prompts with
    `interpretation_ecgs` [M, 12, samples]. Decoding is greedy, as `chat` serves, in batches of
    `batch_size` (each new batch length compiles the decoder once: keep the batches few).
    Returns {"decision": `_decision_scores` (precision / recall of emitting [ECG] for the
    generation requests; the [ECG] share per kind: request, follow_up, report_question, general,
    interpretation, and per wording), "attributes": `_attribute_scores` of the attribute head
    against the record's own values (`record_attributes`) and of the regular expressions +
    defaults (`regex_conditions`) on the generation requests answered with [ECG], "answered":
    their count}.
    """
    rng = np.random.default_rng(seed)
    truth, generation, others = [], [], []
    for record in records:
        attributes = record_attributes(record)
        for _ in range(draws):
            truth.append(attributes)
            generation.append(generation_request(record.report, attributes, rng,
                                                 phrasing=phrasing,
                                                 follow_up_probability=follow_up_probability))
            others.append(text_answered_request(record.report, rng, phrasing=phrasing))
    budget = unified.model.config.num_ecg_tokens + 2
    emitted, predicted = [], []
    for start in range(0, len(generation), batch_size):
        chunk = [list(request.turns) for request in generation[start:start + batch_size]]
        _, _, flags, attributes = unified.respond(chunk, max_new_tokens=budget,
                                                  with_attributes=True)
        emitted.append(flags)
        predicted += ([conditions_from_attributes(attributes, row) for row in range(len(chunk))]
                      if attributes is not None else [None] * len(chunk))
    emitted = np.concatenate(emitted)
    other_flags = [unified.respond([list(r.turns) for r in others[s:s + batch_size]],
                                   max_new_tokens=budget)[2]
                   for s in range(0, len(others), batch_size)]
    kinds = [r.kind for r in generation] + [r.kind for r in others]
    templates = [r.template for r in generation] + [r.template for r in others]
    if interpretation_ecgs is not None and len(interpretation_ecgs):
        ecgs = np.asarray(interpretation_ecgs, np.float32)
        other_flags += [unified.respond([INTERPRETATION_REQUEST] * len(ecgs[s:s + batch_size]),
                                        ecgs[s:s + batch_size], max_new_tokens=budget)[2]
                        for s in range(0, len(ecgs), batch_size)]
        kinds += ["interpretation"] * len(ecgs)
        templates += [INTERPRETATION_REQUEST] * len(ecgs)
    other_flags = np.concatenate(other_flags)
    baseline = [regex_conditions(" ".join(text for role, text in request.turns if role == "user"))
                for request in generation]
    answered = [i for i in range(len(generation)) if emitted[i] and predicted[i] is not None]
    pick = lambda items: [items[i] for i in answered]  # noqa: E731
    return {"decision": _decision_scores(
                np.concatenate([emitted, other_flags]),
                np.arange(len(emitted) + len(other_flags)) < len(emitted), kinds, templates),
            "attributes": _attribute_scores(pick(predicted), pick(baseline), pick(truth),
                                            [dict(generation[i].stated) for i in answered]),
            "answered": len(answered)}
