"""The stage-2 part of `uniecg demo`: align [ECG] tokens on the bundled data, then one model
interprets a held-out ECG and generates one from a text request; and how it reads requests phrased
as users phrase them (trained vs never-trained phrasings): precision / recall of its [ECG]
decision, heart rate / age / sex read by its attribute head against the regex-plus-defaults
baseline, and the heart rate of ECGs generated from requests against the rate asked for.

    lines = run_demo("/tmp/demo/stage2", "/tmp/demo/stage1", "/tmp/demo/diffusion", quick=True)
"""
from __future__ import annotations

import os

import jax
import numpy as np

from uniecg_jax.config import load_config
from uniecg_jax.data.bundled import bundled_split
from uniecg_jax.data.chat_format import GENERATION_REQUEST, INTERPRETATION_REQUEST
from uniecg_jax.data.conversations import generation_request, record_attributes
from uniecg_jax.data.measure import heart_rate_bpm, with_measured_rhythms
from uniecg_jax.data.record import UNKNOWN_HEART_RATE
from uniecg_jax.data.text_encoder import get_text_encoder
from uniecg_jax.diffusion.pipeline import load_pipeline
from uniecg_jax.eval.llm_generate_eval import cosine_similarity, predict_embeddings, \
    request_metrics
from uniecg_jax.inference.chat import UnifiedModel, regex_conditions
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
    held_out = with_measured_rhythms(split["test"])   # heart rate known for every record
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
              f"  requested HR {rate:.0f} bpm; the model read {turn.conditions['heart_rate']:.0f} "
              f"({turn.conditions_source['heart_rate']}); measured {measured:.0f} bpm "
              f"(|error| {abs(measured - rate):.0f})",
              f"  {len(true)} held-out reports through the [ECG] tokens ({int(emitted.sum())} "
              f"answered with them): cosine(predicted, true embedding) mean {cosine.mean():.3f} "
              f"vs mean-embedding baseline {baseline.mean():.3f} (better on "
              f"{int((cosine > baseline).sum())}/{len(true)})"]
    lines += _request_lines(unified, held_out, train_records=split["train"], quick=quick)
    return lines


def _request_lines(unified: UnifiedModel, held_out, train_records, quick: bool) -> list[str]:
    """Decision precision / recall and attribute errors on trained vs held-out phrasings
    (`eval.llm_generate_eval.request_metrics`), and the heart rate of ECGs generated from
    requests that state or imply a rate, conditioned by the attribute head vs by the regex
    baseline (both measured by `data.measure.heart_rate_bpm`)."""
    ecgs = np.stack([r.to_encoder_input() for r in held_out[:2 if quick else 6]])
    lines = []
    for phrasing in ("trained", "held_out"):
        scores = request_metrics(unified, held_out, phrasing=phrasing, seed=1,
                                 interpretation_ecgs=ecgs)
        decision, model, regex = scores["decision"], scores["attributes"], scores["baseline"]
        stated = scores["stated_heart_rate"]
        lines += [f"requests, {phrasing} phrasings: [ECG] decision precision "
                  f"{decision['precision']:.2f} recall {decision['recall']:.2f} "
                  f"({decision['generation_requests']} generation requests, "
                  f"{decision['other_requests']} questions / interpretations)",
                  f"  attributes read by the model on {scores['answered']} answered requests: HR "
                  f"MAE {model['heart_rate_mae']:.1f} bpm, age MAE {model['age_mae']:.1f} y, sex "
                  f"accuracy {model['sex_accuracy']:.2f}; regex + defaults: "
                  f"{regex['heart_rate_mae']:.1f} / {regex['age_mae']:.1f} / "
                  f"{regex['sex_accuracy']:.2f}; where the rate is stated ({stated['requests']}):"
                  f" {stated['model_mae']:.1f} vs {stated['baseline_mae']:.1f} bpm"]
    if unified.diffusion is None:
        return lines
    # Generated heart rate against the rate asked for: held-out records with a known rate, each
    # asked for in a trained phrasing with no stated attributes (implied by the report) or the
    # rate stated; conditioned once by the model's attributes, once by regex + defaults.
    rng = np.random.default_rng(2)
    requests = [(record, generation_request(record.report, record_attributes(record), rng,
                                            state_probability=index % 2))
                for index, record in enumerate(r for r in held_out if r.heart_rate)]
    requests = requests[:2 if quick else 6]
    errors = {"model": [], "regex": []}
    for record, request in requests:
        text = request.turns[-1][1]
        for source in errors:
            override = regex_conditions(text) if source == "regex" else {}
            turn = unified.chat(text, steps=50, **override)
            if turn.generated_ecg is not None:
                errors[source].append(abs(heart_rate_bpm(turn.generated_ecg, turn.sample_rate)
                                          - record.heart_rate))
    if errors["model"]:
        lines.append(f"generated HR vs the requested rate ({len(requests)} requests, half "
                     f"stating it): MAE {np.nanmean(errors['model']):.1f} bpm conditioned by the "
                     f"model's attributes vs {np.nanmean(errors['regex']):.1f} by regex + "
                     "defaults")
    return lines
