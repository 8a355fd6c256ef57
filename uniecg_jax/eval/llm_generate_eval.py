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

from uniecg_jax.data.chat_format import GENERATION_REQUEST
from uniecg_jax.errors import UniECGError
from uniecg_jax.eval import sharded_job
from uniecg_jax.eval.generate_eval import (eval_items, generate_for_items, record_stats,
                                           set_metrics, take_items)


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
