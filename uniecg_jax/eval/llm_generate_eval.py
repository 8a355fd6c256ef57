"""`uniecg eval generate --via llm`: diffusion fidelity metrics on ECGs generated through the unified
model's [ECG] tokens, beside the same metrics with the true text-encoder embedding, and the cosine
similarity between predicted and true embeddings on held-out reports.

    from uniecg_jax.eval import llm_generate_eval
    metrics = llm_generate_eval.run(UnifiedModel.load(ckpt, diffusion=diff_dir), records,
                                    text_encoder=get_text_encoder("minilm"), clip=clip)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from uniecg_jax.data.chat_format import GENERATION_REQUEST
from uniecg_jax.errors import UniECGError
from uniecg_jax.eval.generate_eval import eval_items, fidelity_metrics, generate_for_items

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


def run(unified, records: Sequence, *, text_encoder, n: int = 1, steps: int = 50,
        guidance: float | None = None, seed: int = 0, clip=None, batch_size: int = 8) -> dict:
    """Metrics dict: {"via_llm": fidelity metrics, "true_embedding": fidelity metrics,
    "embedding_cosine": {mean, min, per_record}, "emitted_rate": share of requests answered with
    all [ECG] tokens}. `unified.diffusion` must be loaded."""
    if unified.diffusion is None:
        raise UniECGError("eval generate --via llm needs a diffusion model (--diffusion DIR)")
    items = eval_items(records, text_encoder)
    predicted, emitted = predict_embeddings(unified, items["report"], batch_size)
    cosine = cosine_similarity(predicted, items["text_embedding"])
    via_llm_items = dict(items, text_embedding=predicted.astype(np.float32))
    guidance = unified.diffusion.default_guidance if guidance is None else guidance
    common = dict(n=n, sampler="ddim", steps=steps, guidance=guidance, seed=seed,
                  batch_size=batch_size)
    generated_llm = generate_for_items(unified.diffusion, via_llm_items, **common)
    generated_true = generate_for_items(unified.diffusion, items, **common)
    return {"via_llm": fidelity_metrics(generated_llm, items, n, clip),
            "true_embedding": fidelity_metrics(generated_true, items, n, clip),
            "embedding_cosine": {"mean": float(cosine.mean()), "min": float(cosine.min()),
                                 "per_record": cosine.tolist()},
            "emitted_rate": float(np.mean(emitted)), "num_records": len(records)}


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
