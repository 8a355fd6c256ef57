"""The stage-2 part of `uniecg demo`: align [ECG] tokens on the bundled data, then one model
interprets a held-out ECG and generates one from a text request.

    lines = run_demo("/tmp/demo/stage2", "/tmp/demo/stage1", "/tmp/demo/diffusion", quick=True)
"""
from __future__ import annotations

import os

import jax

from uniecg_jax.config import load_config
from uniecg_jax.data.bundled import bundled_split
from uniecg_jax.data.chat_format import GENERATION_REQUEST, INTERPRETATION_REQUEST
from uniecg_jax.data.measure import heart_rate_bpm
from uniecg_jax.data.record import UNKNOWN_HEART_RATE
from uniecg_jax.data.text_encoder import get_text_encoder
from uniecg_jax.diffusion.pipeline import load_pipeline
from uniecg_jax.eval.llm_generate_eval import cosine_similarity, predict_embeddings
from uniecg_jax.inference.chat import UnifiedModel
from uniecg_jax.inference.interpret import Interpreter
from uniecg_jax.train import build_task
from uniecg_jax.train.loop import train


def run_demo(workdir: str, stage1_dir: str, diffusion_dir: str, quick: bool = False) -> list[str]:
    """Trains stage 2 (configs/stage2.py:demo) from `stage1_dir` with the diffusion model's text
    encoder, then through the single model: interprets a held-out ECG (checked equal to stage 1's
    answer) and generates an ECG from a held-out report (HR error, embedding cosine vs the
    mean-embedding baseline). Returns printable lines."""
    pipeline, diffusion_config = load_pipeline(diffusion_dir)
    overrides = [f"init.stage1_ckpt={stage1_dir}",
                 f"text.encoder={diffusion_config.text.encoder}",
                 f"text.embed_dim={diffusion_config.text.embed_dim}"]
    if quick:
        overrides += ["train.steps=60", "data.num_synthetic=16"]
    config = load_config("configs/stage2.py:demo", overrides)
    task = build_task(config)
    result = train(config, workdir, task)
    task.export(workdir, jax.device_get(result.state.params))
    last = result.history[-1] if result.history else {}

    unified = UnifiedModel.load(workdir, diffusion=pipeline)
    split = bundled_split(int(config.data.holdout_every), int(config.data.num_synthetic),
                          int(config.seed))
    held_out = split["test"]
    ecg_record = held_out[0]
    stage1_text = Interpreter.load(stage1_dir).interpret(ecg_record.to_encoder_input()[None])[0]
    interpretation = unified.chat(INTERPRETATION_REQUEST, ecg=ecg_record.to_encoder_input())
    report_record = next((r for r in held_out if r.heart_rate), held_out[-1])
    rate = float(report_record.heart_rate or UNKNOWN_HEART_RATE)
    request = f"{GENERATION_REQUEST}{report_record.report} Heart rate {rate:.0f} bpm."
    out_dir = os.path.join(workdir, "generated")
    turn = unified.chat(request, out_dir=out_dir, steps=50)

    # Alignment on every held-out report (one report is too noisy a score): the LLM path's
    # predicted embedding against the true one, beside the best constant guess (the mean
    # embedding of the training reports).
    encoder = get_text_encoder(str(config.text.encoder))
    held_out_reports = [r.report for r in held_out]
    true = encoder.encode(held_out_reports)
    predicted, emitted = predict_embeddings(unified, held_out_reports)
    train_mean = encoder.encode([r.report for r in split["train"]]).mean(0, keepdims=True)
    cosine = cosine_similarity(predicted, true)
    baseline = cosine_similarity(train_mean, true)     # [1, D] broadcasts against [N, D]
    lines = [f"stage 2: {result.steps_run} steps, token nll {last.get('token_nll', float('nan')):.3f},"
             f" alignment cosine {last.get('cosine', float('nan')):.3f} (train batch)",
             f"interpret {ecg_record.record_id}: {interpretation.text[:160]}",
             f"  equals stage-1 answer (greedy): {interpretation.text == stage1_text}; "
             f"[ECG] emitted: {interpretation.emitted_ecg_tokens}"]
    if not turn.emitted_ecg_tokens:
        lines.append(f"generate: the model did not emit [ECG] tokens (answered {turn.text[:80]!r})")
        return lines
    measured = heart_rate_bpm(turn.generated_ecg, turn.sample_rate)
    lines += [f"generate from {report_record.record_id}'s report: wrote {turn.files[0]}.hea/.png",
              f"  requested HR {rate:.0f} bpm, measured {measured:.0f} bpm "
              f"(|error| {abs(measured - rate):.0f})",
              f"  {len(true)} held-out reports through the [ECG] tokens ({int(emitted.sum())} "
              f"answered with them): cosine(predicted, true embedding) mean {cosine.mean():.3f} "
              f"vs mean-embedding baseline {baseline.mean():.3f} (better on "
              f"{int((cosine > baseline).sum())}/{len(true)})"]
    return lines
