"""`uniecg eval generate`: fidelity of generated ECGs against real conditions and real records.

For each evaluation record (bundled real records + synthetic ECGs with known heart rate, or a
`uniecg prep` folder) the model generates `n` ECGs from that record's report embedding, sex, age and
heart rate (batched over records), and the job reports:

* heart-rate MAE against the requested rate, by QRS detection (`ecg_fidelity`);
* QRS-detection F1 of each generated ECG against its real reference's beats, after the best
  constant time shift (the generator cannot know the beat phase, so this scores rhythm: rate and
  regularity);
* per-lead amplitude statistics, generated vs real (`ecg_fidelity.compare_amplitudes`);
* from the ECG-text CLIP (`uniecg_jax.models.ecg_clip`), DiffuSETS's definitions
  (`test_scripts/evaluation.py` of DiffuSETS_Exp-Extended):
  - CLIP score: mean cosine between projected generated-ECG and projected text features
    (`clip_score`; `clip_score_100` is the torchmetrics-style 100 * mean(max(cos, 0)));
  - FID: Frechet distance between Gaussian fits of the (unnormalised) CLIP ECG features of the
    real and the generated ECGs; rFID = FID / FID(first vs second half of the real set);
  - k-NN (k = 3) precision / recall / F1 of the two feature sets;
* the same for a baseline: unconditional samples (guidance 0, the learned null condition).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from scipy import linalg

from uniecg_jax.data.bundled import diffusion_records
from uniecg_jax.data.measure import detect_r_peaks, with_measured_rhythms
from uniecg_jax.data.record import DIFFUSION_FS, UNKNOWN_AGE, UNKNOWN_HEART_RATE
from uniecg_jax.data.text_encoder import text_encoder_for
from uniecg_jax.diffusion.pipeline import load_pipeline
from uniecg_jax.errors import CheckpointError
from uniecg_jax.eval import clip_training, ecg_fidelity
from uniecg_jax.eval.interpret_eval import load_eval_records
from uniecg_jax.models.ecg_clip import embed_ecgs, embed_texts


# ------------------------------------------------------------------------------ feature metrics

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
                     ) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (imaginary round-off dropped)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(
        np.float64)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):  # singular product: regularise as pytorch-fid does
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2.0 * covmean))


def feature_fid(real: np.ndarray, generated: np.ndarray) -> float:
    """FID between feature matrices `[N, E]` (sample covariance, rows are samples)."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if len(real) < 2 or len(generated) < 2:
        raise ValueError(f"FID needs >= 2 samples per set, got {len(real)} and {len(generated)}")
    return frechet_distance(real.mean(0), np.cov(real, rowvar=False), generated.mean(0),
                            np.cov(generated, rowvar=False))


def knn_precision_recall(generated: np.ndarray, real: np.ndarray, k: int = 3) -> dict:
    """Improved precision/recall: a point is inside a set's manifold when it lies within the
    distance from some member to that member's k-th nearest neighbour (DiffuSETS, k = 3)."""
    def radii(points):
        distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(distances, axis=1)[:, min(k, len(points) - 1)]

    def inside(queries, points, point_radii):
        distances = np.linalg.norm(queries[:, None] - points[None], axis=-1)
        return np.any(distances <= point_radii[None], axis=1)

    generated, real = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    precision = float(inside(generated, real, radii(real)).mean())
    recall = float(inside(real, generated, radii(generated)).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def clip_scores(ecg_features: np.ndarray, text_features: np.ndarray) -> dict:
    """DiffuSETS CLIP score (mean cosine) and 100 * mean(max(cos, 0)) per pair of rows."""
    e = ecg_features / np.maximum(np.linalg.norm(ecg_features, axis=-1, keepdims=True), 1e-12)
    t = text_features / np.maximum(np.linalg.norm(text_features, axis=-1, keepdims=True), 1e-12)
    cos = np.sum(e * t, axis=-1)
    return {"clip_score": float(cos.mean()), "clip_score_100": float(100 * np.maximum(cos, 0).mean())}


def aligned_qrs_f1(generated_beats: np.ndarray, reference_beats: np.ndarray,
                   tolerance: float = 0.15) -> float:
    """Best F1 of `ecg_fidelity.qrs_f1` over constant shifts that align one generated beat with the
    first reference beat."""
    if len(generated_beats) == 0 or len(reference_beats) == 0:
        return 0.0
    shifts = reference_beats[0] - generated_beats
    return max(ecg_fidelity.qrs_f1(generated_beats + s, reference_beats, tolerance)["f1"]
               for s in shifts)


# ------------------------------------------------------------------------------------ the job

def eval_items(records: Sequence, text_encoder) -> dict:
    """Conditions and references of evaluation records: text embedding, sex code, age, hr,
    real ECG `[N, 12, 1024]` (unknown age/hr default as in training: 50 / 70)."""
    return {"record_id": [r.record_id for r in records],
            "report": [r.report for r in records],
            "text_embedding": np.asarray(text_encoder.encode([r.report for r in records]),
                                         np.float32),
            "sex": np.array([r.sex_code if r.sex in ("M", "F") else 1.0 for r in records],
                            np.float32),
            "age": np.array([UNKNOWN_AGE if r.age is None else r.age for r in records], np.float32),
            "hr": np.array([UNKNOWN_HEART_RATE if r.heart_rate is None else r.heart_rate
                            for r in records], np.float32),
            "real": np.stack([r.to_diffusion_input() for r in records])}


def generate_for_items(pipeline, items: dict, *, n: int, sampler: str, steps: int,
                       guidance: float, seed: int, batch_size: int = 32) -> np.ndarray:
    """`[R * n, 12, 1024]` generated ECGs (record r's samples at rows r*n ... r*n+n-1)."""
    outputs = []
    count = len(items["hr"])
    for start in range(0, count, batch_size):
        part = slice(start, min(count, start + batch_size))
        outputs.append(pipeline.generate(
            items["text_embedding"][part], sex=items["sex"][part], age=items["age"][part],
            hr=items["hr"][part], n=n, sampler=sampler, steps=steps, guidance=guidance,
            seed=seed + start))
    return np.concatenate(outputs)


def beat_times(ecg: np.ndarray, qrs_method: str) -> np.ndarray:
    """R-peak times (s) on lead II of a `[12, 1024]` ECG at 102.4 Hz (`data.measure`)."""
    return detect_r_peaks(ecg[1], DIFFUSION_FS, qrs_method) / DIFFUSION_FS


def fidelity_metrics(generated: np.ndarray, items: dict, n: int, clip=None,
                     qrs_method: str = "kalidas2017") -> dict:
    """All metrics for `generated` `[R * n, 12, L]` against `items` (see module docstring)."""
    requested = np.repeat(items["hr"], n)
    hr = ecg_fidelity.heart_rate_mae(generated, DIFFUSION_FS, requested, method=qrs_method)
    real_beats = [beat_times(ecg, qrs_method) for ecg in items["real"]]
    f1 = [aligned_qrs_f1(beat_times(ecg, qrs_method), real_beats[i // n])
          for i, ecg in enumerate(generated)]
    metrics = {"num_generated": int(len(generated)), "hr_mae": hr["hr_mae"],
               "hr_undetected": hr["undetected"], "detected_hr": hr["detected_hr"],
               "requested_hr": requested.tolist(), "qrs_f1_vs_reference": float(np.mean(f1)),
               "amplitude": ecg_fidelity.compare_amplitudes(generated, items["real"])}
    if clip is not None:
        model, variables = clip
        gen_features = embed_ecgs(model, variables, generated)
        real_features = embed_ecgs(model, variables, items["real"])
        text_features = embed_texts(model, variables, np.repeat(items["text_embedding"], n, 0))
        metrics.update(clip_scores(gen_features, text_features))
        metrics["clip_score_real"] = clip_scores(
            real_features, embed_texts(model, variables, items["text_embedding"]))["clip_score"]
        fid = feature_fid(real_features, gen_features)
        half = len(real_features) // 2
        scale = feature_fid(real_features[:half], real_features[half:]) if half >= 2 else np.nan
        metrics.update(fid=fid, rfid=float(fid / scale) if scale and np.isfinite(scale) else None,
                       knn=knn_precision_recall(gen_features, real_features))
    return metrics


def get_or_train_clip(directory: str, records: Sequence, text_encoder, text_encoder_name: str,
                      steps: int = 300, seed: int = 0):
    """(model, variables) from `directory`, or trained on `records` and saved there."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        model, variables, config = clip_training.load_clip(directory)
        if int(config.clip.text_embed_dim) != int(getattr(text_encoder, "dim", 0) or
                                                  config.clip.text_embed_dim):
            raise CheckpointError(f"{directory}: CLIP was trained on {config.clip.text_embed_dim}-d "
                                  f"text embeddings, the model uses {text_encoder.dim}-d")
        return model, variables
    ecgs = np.stack([r.to_diffusion_input() for r in records])
    texts = text_encoder.encode([r.report for r in records])
    model, variables, losses = clip_training.train_clip(ecgs, texts, steps=steps, seed=seed)
    clip_training.save_clip(directory, model.cfg, variables, text_encoder_name)
    print(f"[clip] trained {steps} steps on {len(records)} ECGs (loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}); saved {directory}", flush=True)
    return model, variables


def run_eval(ckpt: str, out: str, *, clip_dir: str | None = None, data: str = "bundled",
             n: int = 2, sampler: str = "ddim", steps: int = 50, guidance: float | None = None,
             baseline: bool = True, max_records: int = 0, clip_steps: int = 300, seed: int = 0,
             batch_size: int = 32) -> dict:
    """Generates for every evaluation record, scores, writes `out` (JSON) and returns the metrics."""
    pipeline, config = load_pipeline(ckpt)
    guidance = pipeline.default_guidance if guidance is None else guidance
    text_encoder = text_encoder_for(config)
    clip_records = diffusion_records(config) if clip_dir or data == "bundled" else []
    if data == "bundled":
        records = clip_records
    else:
        records = with_measured_rhythms(load_eval_records(data, config))
    if max_records:
        records = records[:max_records]
    items = eval_items(records, text_encoder)
    clip = None
    if clip_dir:
        clip = get_or_train_clip(clip_dir, clip_records, text_encoder,
                                 str(config.text.encoder), steps=clip_steps, seed=seed)
    results = {"ckpt": os.path.abspath(ckpt), "data": data, "num_records": len(records),
               "samples_per_record": n, "sampler": sampler, "steps": steps, "guidance": guidance,
               "clip": clip_dir}
    generated = generate_for_items(pipeline, items, n=n, sampler=sampler, steps=steps,
                                   guidance=guidance, seed=seed, batch_size=batch_size)
    results["model"] = fidelity_metrics(generated, items, n, clip)
    if baseline:
        unconditional = generate_for_items(pipeline, items, n=n, sampler=sampler, steps=steps,
                                           guidance=0.0, seed=seed, batch_size=batch_size)
        results["baseline_unconditional"] = fidelity_metrics(unconditional, items, n, clip)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=_jsonable)
    return results


def _jsonable(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary_lines(results: dict) -> list[str]:
    """One line per scored set: HR MAE, QRS F1, CLIP score, FID."""
    lines = []
    for name in ("model", "baseline_unconditional"):
        m = results.get(name)
        if not m:
            continue
        parts = [f"{name}: HR MAE {m['hr_mae']:.1f} bpm ({m['hr_undetected']} undetected)",
                 f"QRS F1 vs reference {m['qrs_f1_vs_reference']:.2f}",
                 f"amp |log std ratio| {m['amplitude']['mean_abs_log_std_ratio']:.2f}"]
        if "clip_score" in m:
            parts += [f"CLIP score {m['clip_score']:.3f} (real {m['clip_score_real']:.3f})",
                      f"FID {m['fid']:.2f}"]
        lines.append("; ".join(parts))
    return lines
