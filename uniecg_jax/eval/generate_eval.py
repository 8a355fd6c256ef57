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

The job is sharded and resumable like `eval interpret` (`eval.sharded_job`): blocks of `batch_size`
records go round robin to the hosts, each block is one generation call sharded over the host's
devices (seed = `seed` + the block's first record index, so the samples do not depend on the host
count), each host appends per-record statistics (`record_stats`: detected rates, QRS F1, amplitude
moments, CLIP features and cosines) to its part file, and `merge` computes the set-level metrics
(`set_metrics`: FID, k-NN precision/recall, CLIP-score means, HR MAE) once over every part.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from scipy import linalg

from uniecg_jax.data.bundled import diffusion_records
from uniecg_jax.data.measure import detect_r_peaks, heart_rate_bpm, with_measured_rhythms
from uniecg_jax.data.record import DIFFUSION_FS, UNKNOWN_AGE, UNKNOWN_HEART_RATE
from uniecg_jax.data.text_encoder import text_encoder_for
from uniecg_jax.diffusion.pipeline import load_pipeline
from uniecg_jax.errors import CheckpointError, UniECGError
from uniecg_jax.eval import clip_training, ecg_fidelity, sharded_job
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


def pair_cosines(ecg_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """`[N]` cosine between row i of `[N, E]` ECG features and row i of `[N, E]` text features."""
    e = ecg_features / np.maximum(np.linalg.norm(ecg_features, axis=-1, keepdims=True), 1e-12)
    t = text_features / np.maximum(np.linalg.norm(text_features, axis=-1, keepdims=True), 1e-12)
    return np.sum(e * t, axis=-1)


def clip_scores(ecg_features: np.ndarray, text_features: np.ndarray) -> dict:
    """DiffuSETS CLIP score (mean cosine) and 100 * mean(max(cos, 0)) per pair of rows."""
    return clip_scores_of(pair_cosines(ecg_features, text_features))


def clip_scores_of(cos: np.ndarray) -> dict:
    """`clip_scores` from the pair cosines `[N]`."""
    cos = np.asarray(cos, np.float64)
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
                       guidance: float, seed: int, batch_size: int = 32,
                       data_parallel: bool = False) -> np.ndarray:
    """`[R * n, 12, 1024]` generated ECGs (record r's samples at rows r*n ... r*n+n-1); batch b
    (records from `start`) with seed `seed + start`, its rows sharded over this host's devices
    when `data_parallel`."""
    outputs = []
    count = len(items["hr"])
    for start in range(0, count, batch_size):
        part = slice(start, min(count, start + batch_size))
        outputs.append(pipeline.generate(
            items["text_embedding"][part], sex=items["sex"][part], age=items["age"][part],
            hr=items["hr"][part], n=n, sampler=sampler, steps=steps, guidance=guidance,
            seed=seed + start, data_parallel=data_parallel))
    return np.concatenate(outputs)


def beat_times(ecg: np.ndarray, qrs_method: str) -> np.ndarray:
    """R-peak times (s) on lead II of a `[12, 1024]` ECG at 102.4 Hz (`data.measure`)."""
    return detect_r_peaks(ecg[1], DIFFUSION_FS, qrs_method) / DIFFUSION_FS


def record_stats(generated: np.ndarray, items: dict, n: int, clip=None,
                 qrs_method: str = "kalidas2017") -> list[dict]:
    """Per-record statistics of `generated` `[R * n, 12, L]` against `items` (R records): all that
    the set-level metrics need (`set_metrics`), JSON-serialisable, so that hosts can write them to
    part files and one merge computes FID and precision/recall over every part. Each row:
    requested_hr, detected_hr [n], qrs_f1 [n], amplitude / real_amplitude moments and, with a CLIP,
    features [n, E], real_features [E], clip_cos [n] (generated vs text), real_clip_cos."""
    count = len(items["hr"])
    detected = [heart_rate_bpm(ecg, DIFFUSION_FS, method=qrs_method) for ecg in generated]
    real_beats = [beat_times(ecg, qrs_method) for ecg in items["real"]]
    f1 = [aligned_qrs_f1(beat_times(ecg, qrs_method), real_beats[i // n])
          for i, ecg in enumerate(generated)]
    rows = []
    for r in range(count):
        mine = slice(r * n, (r + 1) * n)
        rows.append({"requested_hr": float(items["hr"][r]), "detected_hr": detected[mine],
                     "qrs_f1": f1[mine],
                     "amplitude": ecg_fidelity.amplitude_moments(generated[mine]),
                     "real_amplitude": ecg_fidelity.amplitude_moments(items["real"][r:r + 1])})
    if clip is not None:
        model, variables = clip
        gen_features = embed_ecgs(model, variables, generated)
        real_features = embed_ecgs(model, variables, items["real"])
        cos = pair_cosines(gen_features, embed_texts(
            model, variables, np.repeat(items["text_embedding"], n, 0)))
        real_cos = pair_cosines(real_features, embed_texts(model, variables,
                                                           items["text_embedding"]))
        for r, row in enumerate(rows):
            mine = slice(r * n, (r + 1) * n)
            row.update(features=gen_features[mine].tolist(),
                       real_features=real_features[r].tolist(),
                       clip_cos=cos[mine].tolist(), real_clip_cos=float(real_cos[r]))
    return rows


def set_metrics(rows: Sequence[dict]) -> dict:
    """The set-level metrics (see module docstring) over every record's `record_stats` row."""
    requested = np.concatenate([[row["requested_hr"]] * len(row["detected_hr"]) for row in rows])
    hr = ecg_fidelity.rate_errors([rate for row in rows for rate in row["detected_hr"]], requested)
    amplitude = ecg_fidelity.compare_amplitude_stats(
        *(ecg_fidelity.stats_from_moments(ecg_fidelity.combine_amplitude_moments(
            [row[key] for row in rows])) for key in ("amplitude", "real_amplitude")))
    metrics = {"num_generated": int(len(requested)), "hr_mae": hr["hr_mae"],
               "hr_undetected": hr["undetected"], "detected_hr": hr["detected_hr"],
               "requested_hr": requested.tolist(),
               "qrs_f1_vs_reference": float(np.mean([f for row in rows for f in row["qrs_f1"]])),
               "amplitude": amplitude}
    if "features" in rows[0]:
        gen_features = np.array([f for row in rows for f in row["features"]], np.float64)
        real_features = np.array([row["real_features"] for row in rows], np.float64)
        metrics.update(clip_scores_of([c for row in rows for c in row["clip_cos"]]))
        metrics["clip_score_real"] = clip_scores_of([row["real_clip_cos"] for row in rows]
                                                    )["clip_score"]
        fid = feature_fid(real_features, gen_features)
        half = len(real_features) // 2
        scale = feature_fid(real_features[:half], real_features[half:]) if half >= 2 else np.nan
        metrics.update(fid=fid, rfid=float(fid / scale) if scale and np.isfinite(scale) else None,
                       knn=knn_precision_recall(gen_features, real_features))
    return metrics


def fidelity_metrics(generated: np.ndarray, items: dict, n: int, clip=None,
                     qrs_method: str = "kalidas2017") -> dict:
    """All metrics for `generated` `[R * n, 12, L]` against `items` (see module docstring)."""
    return set_metrics(record_stats(generated, items, n, clip, qrs_method))


def take_items(items: dict, indices: Sequence[int]) -> dict:
    """The `eval_items` of the records at `indices`."""
    return {key: [value[i] for i in indices] if isinstance(value, list) else value[list(indices)]
            for key, value in items.items()}


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


def load_items(config, text_encoder, data: str = "bundled", max_records: int = 0
               ) -> tuple[list, dict]:
    """(records, eval_items) of the evaluation set: the bundled real + synthetic diffusion records,
    or the test records of a `uniecg prep` / WFDB folder (rhythm measured), the first
    `max_records` (0 = all)."""
    if data == "bundled":
        records = diffusion_records(config)
    else:
        records = with_measured_rhythms(load_eval_records(data, config))
    if max_records:
        records = records[:max_records]
    return records, eval_items(records, text_encoder)


def run_shard(pipeline, items: dict, out: str, *, clip=None, n: int = 2, sampler: str = "ddim",
              steps: int = 50, guidance: float, baseline: bool = True, seed: int = 0,
              batch_size: int = 32, process_index: int = 0, process_count: int = 1,
              progress: bool = True) -> str:
    """Generates and scores this host's share of `items` into its part file; returns its path.

    Hosts take blocks of `batch_size` consecutive records (block j on host j % process_count); a
    block is one `pipeline.generate` call sharded over this host's devices with seed
    `seed + first record index`, so every record's samples are those of a one-host run with the
    same batch size, however many hosts share the job, and a resumed job equals an uninterrupted one.
    """
    sets = [("model", guidance)] + ([("baseline_unconditional", 0.0)] if baseline else [])

    def generate_block(indices: list[int]) -> list[dict]:
        block = take_items(items, indices)
        rows: list[dict] = [{} for _ in indices]
        for name, set_guidance in sets:
            generated = generate_for_items(pipeline, block, n=n, sampler=sampler, steps=steps,
                                           guidance=set_guidance, seed=seed + indices[0],
                                           batch_size=len(indices), data_parallel=True)
            for row, stats in zip(rows, record_stats(generated, block, n, clip)):
                row[name] = stats
        return rows

    settings = dict(n=n, sampler=sampler, steps=steps, guidance=guidance, baseline=baseline,
                    seed=seed, batch_size=batch_size, clip=clip is not None)
    return sharded_job.run_shard(items["record_id"], generate_block, out,
                                 process_index=process_index, process_count=process_count,
                                 batch_size=batch_size, block=batch_size, settings=settings,
                                 desc="eval generate", progress=progress)


def merge(out: str, process_count: int, items: dict, header: dict) -> dict | None:
    """Once every host's part is done: the set-level metrics of each generated set over all
    records (FID, k-NN precision/recall and CLIP-score means computed once, over every part),
    written to `out` (JSON, `header` first) and returned; None while a part is missing."""
    rows = sharded_job.read_parts(out, process_count, items["record_id"])
    if rows is None:
        return None
    results = dict(header, num_records=len(rows))
    for name in ("model", "baseline_unconditional"):
        if name in rows[0]:
            results[name] = set_metrics([row[name] for row in rows])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=_jsonable)
    return results


def clip_on_every_host(directory: str, records: Sequence, text_encoder, text_encoder_name: str,
                       *, steps: int, seed: int, process_index: int, process_count: int,
                       manual_hosts: bool):
    """`get_or_train_clip` for a sharded job: host 0 trains a missing CLIP and saves it, the
    other hosts of a JAX job wait for it and load it; hosts run by hand need host 0 to have run."""
    if process_index == 0 or os.path.isfile(os.path.join(directory, "config.json")):
        clip = get_or_train_clip(directory, records, text_encoder, text_encoder_name,
                                 steps=steps, seed=seed)
        sharded_job.wait_for_hosts(process_count, manual_hosts, "eval generate: CLIP ready")
        return clip
    sharded_job.wait_for_hosts(process_count, manual_hosts, "eval generate: CLIP ready")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise UniECGError(f"{directory}: no CLIP checkpoint yet; run host 0 first (it trains and "
                          "saves the CLIP) or pass a trained --clip")
    return get_or_train_clip(directory, records, text_encoder, text_encoder_name)


def run_eval(ckpt: str, out: str, *, clip_dir: str | None = None, data: str = "bundled",
             n: int = 2, sampler: str = "ddim", steps: int = 50, guidance: float | None = None,
             baseline: bool = True, max_records: int = 0, clip_steps: int = 300, seed: int = 0,
             batch_size: int = 32, process_index: int = 0, process_count: int = 1,
             manual_hosts: bool = True, progress: bool = True, conv_algorithm: str | None = None
             ) -> dict | None:
    """Generates for this host's share of the evaluation records (`run_shard`), then merges when
    every part is done: writes `out` (JSON) and returns the metrics (None while parts are missing,
    or on hosts other than 0 of a JAX multi-host job, which synchronises its hosts instead of
    every host trying: `manual_hosts` False).

    A CLIP missing at `clip_dir` is trained by host 0; the other hosts of a JAX job wait for it,
    hosts run by hand need host 0 to have run first."""
    pipeline, config = load_pipeline(ckpt, conv_algorithm)
    guidance = pipeline.default_guidance if guidance is None else guidance
    text_encoder = text_encoder_for(config)
    _, items = load_items(config, text_encoder, data, max_records)
    clip = None
    if clip_dir:
        clip = clip_on_every_host(clip_dir, diffusion_records(config), text_encoder,
                                  str(config.text.encoder), steps=clip_steps, seed=seed,
                                  process_index=process_index, process_count=process_count,
                                  manual_hosts=manual_hosts)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    run_shard(pipeline, items, out, clip=clip, n=n, sampler=sampler, steps=steps,
              guidance=guidance, baseline=baseline, seed=seed, batch_size=batch_size,
              process_index=process_index, process_count=process_count, progress=progress)
    sharded_job.wait_for_hosts(process_count, manual_hosts, "eval generate: parts written")
    if not sharded_job.should_merge(process_index, manual_hosts):
        return None
    header = {"ckpt": os.path.abspath(ckpt), "data": data, "samples_per_record": n,
              "sampler": sampler, "steps": steps, "guidance": guidance, "clip": clip_dir,
              "hosts": process_count, "batch_size": batch_size}
    return merge(out, process_count, items, header)


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
