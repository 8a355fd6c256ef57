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
from uniecg_jax.data.conversations import PHRASINGS, generation_request, record_attributes
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
from uniecg_jax.train.stage2 import data_seed


SEEDS = (0, 1)    # training seeds (alignment / attribute heads' init, request draws, shuffling)


def _train_seed(workdir: str, stage1_dir: str, diffusion_config, seed: int, quick: bool):
    """Trains (or resumes) configs/stage2.py:demo with training seed `seed` on the one data draw
    (data.seed 0) and exports it. Returns (config, train result)."""
    overrides = [f"init.stage1_ckpt={stage1_dir}", f"seed={seed}", "data.seed=0",
                 f"text.encoder={diffusion_config.text.encoder}",
                 f"text.embed_dim={diffusion_config.text.embed_dim}"]
    if quick:
        overrides += ["train.steps=60", "data.num_synthetic=16"]
    config = load_config("configs/stage2.py:demo", overrides)
    task = build_task(config)
    result = train(config, workdir, task)
    task.export(workdir, jax.device_get(result.state.params))
    return config, result


def _spread(values, spec: str = ".2f") -> str:
    """Per-seed values as "a / b (mean m)"."""
    values = [float(v) for v in values]
    text = " / ".join(format(v, spec) for v in values)
    finite = [v for v in values if np.isfinite(v)]
    mean = float(np.mean(finite)) if finite else float("nan")
    return text if len(values) == 1 else f"{text} (mean {format(mean, spec)})"


def run_demo(workdir: str, stage1_dir: str, diffusion_dir: str, quick: bool = False,
             seeds=SEEDS) -> list[str]:
    """Trains stage 2 (configs/stage2.py:demo) from `stage1_dir` with the diffusion model's text
    encoder, once per training seed (`seeds[0]` in `workdir`, the others in `workdir_seedK`, one
    data draw), then through each single model: interprets a held-out ECG (checked equal to
    stage 1's answer), generates an ECG from a held-out report (HR error), scores the embedding
    cosine vs the mean-embedding baseline and how it reads requests (`_request_lines`). Every
    figure is printed per seed. Returns printable lines."""
    pipeline, diffusion_config = load_pipeline(diffusion_dir)
    lines = []
    per_seed = []
    for seed in seeds:
        directory = workdir if seed == seeds[0] else f"{workdir}_seed{seed}"
        config, result = _train_seed(directory, stage1_dir, diffusion_config, seed, quick)
        last = result.history[-1] if result.history else {}
        if not result.steps_run:   # a rerun: the seed's training had finished
            lines.append(f"stage 2, seed {seed} ({directory}): already trained, reused")
        else:
            lines.append(f"stage 2, seed {seed} ({directory}): {result.steps_run} steps, token "
                         f"nll {last.get('token_nll', float('nan')):.3f}, alignment cosine "
                         f"{last.get('cosine', float('nan')):.3f}, decision accuracy "
                         f"{last.get('decision_accuracy', float('nan')):.2f} (train batch)")
        per_seed.append(_seed_scores(UnifiedModel.load(directory, diffusion=pipeline), config,
                                     stage1_dir, directory, quick))
    first = per_seed[0]
    lines += [f"interpret {first['ecg_record']}: {first['interpretation'][:160]}",
              "  equals stage-1 answer (greedy), per seed: "
              + " / ".join(str(s["preserved"]) for s in per_seed)
              + "; [ECG] emitted: " + " / ".join(str(s["interpretation_emitted"])
                                                 for s in per_seed)]
    if first["generated"] is not None:
        lines += [f"generate from {first['report_record']}'s report (seed {seeds[0]}): wrote "
                  f"{first['generated']}.hea/.png",
                  f"  requested HR {first['rate']:.0f} bpm; the model read "
                  + _spread([s["read_rate"] for s in per_seed], ".0f")
                  + "; measured " + _spread([s["measured_rate"] for s in per_seed], ".0f")
                  + " bpm"]
    else:
        lines.append(f"generate: the model did not emit [ECG] tokens (answered "
                     f"{first['answer'][:80]!r})")
    lines.append(f"  {first['reports']} held-out reports through the [ECG] tokens (answered with "
                 f"them: {' / '.join(str(s['emitted']) for s in per_seed)}): cosine(predicted, "
                 f"true embedding) mean {_spread([s['cosine'] for s in per_seed], '.3f')} vs the "
                 f"mean-embedding baseline {first['baseline_cosine']:.3f} (better on "
                 f"{' / '.join(str(s['better']) for s in per_seed)})")
    lines += _request_lines(per_seed, seeds)
    return lines


def _seed_scores(unified: UnifiedModel, config, stage1_dir: str, workdir: str, quick: bool
                 ) -> dict:
    """Everything the demo prints for one trained seed (see `run_demo`)."""
    split = bundled_split(int(config.data.holdout_every), int(config.data.num_synthetic),
                          data_seed(config))
    held_out = with_measured_rhythms(split["test"])   # heart rate known for every record
    ecg_record = held_out[0]
    stage1_text = Interpreter.load(stage1_dir).interpret(ecg_record.to_encoder_input()[None])[0]
    interpretation = unified.chat(INTERPRETATION_REQUEST, ecg=ecg_record.to_encoder_input())
    report_record = next((r for r in held_out if r.heart_rate), held_out[-1])
    rate = float(report_record.heart_rate or UNKNOWN_HEART_RATE)
    turn = unified.chat(f"{GENERATION_REQUEST}{report_record.report} Heart rate {rate:.0f} bpm.",
                        out_dir=os.path.join(workdir, "generated"), steps=50)
    # Alignment on every held-out report (one report is too noisy a score): the LLM path's
    # predicted embedding against the true one, beside the best constant guess (the mean
    # embedding of the training reports).
    encoder = get_text_encoder(str(config.text.encoder))
    true = encoder.encode([r.report for r in held_out])
    predicted, emitted = predict_embeddings(unified, [r.report for r in held_out])
    train_mean = encoder.encode([r.report for r in split["train"]]).mean(0, keepdims=True)
    cosine = cosine_similarity(predicted, true)
    baseline = cosine_similarity(train_mean, true)     # [1, D] broadcasts against [N, D]
    scores = dict(ecg_record=ecg_record.record_id, interpretation=interpretation.text,
                  preserved=interpretation.text == stage1_text,
                  interpretation_emitted=interpretation.emitted_ecg_tokens,
                  report_record=report_record.record_id, rate=rate, answer=turn.text,
                  generated=turn.files[0] if turn.files else None,
                  read_rate=float("nan"), measured_rate=float("nan"),
                  reports=len(true), emitted=int(emitted.sum()), cosine=float(cosine.mean()),
                  baseline_cosine=float(baseline.mean()),
                  better=int((cosine > baseline).sum()))
    if turn.generated_ecg is not None:
        scores.update(read_rate=turn.conditions["heart_rate"],
                      measured_rate=heart_rate_bpm(turn.generated_ecg, turn.sample_rate))
    ecgs = np.stack([r.to_encoder_input() for r in held_out[:2 if quick else 6]])
    scores["requests"] = {phrasing: request_metrics(
        unified, held_out, phrasing=phrasing, seed=1, interpretation_ecgs=ecgs,
        draws=1 if quick else 2) for phrasing in PHRASINGS}
    scores["generated_rate"] = _generated_rate_errors(unified, held_out, quick)
    return scores


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _request_lines(per_seed: list[dict], seeds) -> list[str]:
    """Decision precision / recall (and the [ECG] share per kind of request) and attribute errors
    (stated vs implied, the attribute head vs regex + defaults and vs the best constant guess in
    hindsight) on trained vs held-out phrasings
    (`eval.llm_generate_eval.request_metrics`), and the heart rate of generated ECGs, per seed."""
    lines = [f"requests (values per training seed {' / '.join(map(str, seeds))}):"]
    for phrasing in PHRASINGS:
        scores = [s["requests"][phrasing] for s in per_seed]
        decision = [s["decision"] for s in scores]
        kinds = decision[0]["emitted_by_kind"]
        lines += [f"  {phrasing} phrasings: [ECG] decision precision "
                  f"{_spread([d['precision'] for d in decision])}, recall "
                  f"{_spread([d['recall'] for d in decision])} "
                  f"({decision[0]['generation_requests']} generation requests, "
                  f"{decision[0]['other_requests']} others)",
                  "    answered with [ECG]: " + "; ".join(
                      f"{kind} ({count}) "
                      + _spread([d["emitted_by_kind"][kind][0] for d in decision])
                      for kind, (_, count) in kinds.items())]
        if phrasing == "held_out":   # which new wordings fail (the trained ones all pass)
            wordings = [w for w in decision[0]["emitted_by_template"]
                        if w != INTERPRETATION_REQUEST]
            lines.append("    answered with [ECG], by wording: " + "; ".join(
                f"{_shorten(wording)!r} ({decision[0]['emitted_by_template'][wording][1]}) "
                + _spread([d["emitted_by_template"].get(wording, (float("nan"), 0))[0]
                           for d in decision]) for wording in wordings))
        for name, unit in (("heart_rate", "bpm MAE"), ("age", "y MAE"), ("sex", "accuracy")):
            spec = ".2f" if name == "sex" else ".1f"
            parts = []
            for part in ("stated", "implied"):
                cells = [s["attributes"][name][part] for s in scores]
                parts.append(f"{part} ({'/'.join(str(c['requests']) for c in cells)}): model "
                             f"{_spread([c['model'] for c in cells], spec)} vs regex "
                             f"{_spread([c['baseline'] for c in cells], spec)}, best constant "
                             f"{_spread([c['constant'] for c in cells], spec)}")
            lines.append(f"    {name} {unit}, " + "; ".join(parts))
    errors = [s["generated_rate"] for s in per_seed]
    if all(e["model"] for e in errors):
        model = _spread([np.nanmean(e["model"]) for e in errors], ".1f")
        regex = _spread([np.nanmean(e["regex"]) for e in errors], ".1f")
        lines.append(f"  generated HR vs the requested rate ({errors[0]['requests']} requests, "
                     f"half stating it): MAE {model} bpm conditioned by the model's attributes "
                     f"vs {regex} by regex + defaults")
    return lines


def _generated_rate_errors(unified: UnifiedModel, held_out, quick: bool) -> dict:
    """|generated HR - the record's rate| per request: held-out records with a known rate, each
    asked for in a trained phrasing with no stated attributes (implied by the report) or the rate
    stated; conditioned once by the model's attributes, once by regex + defaults (both measured
    by `data.measure.heart_rate_bpm`). {"model": [...], "regex": [...], "requests": n}."""
    if unified.diffusion is None:
        return {"model": [], "regex": [], "requests": 0}
    rng = np.random.default_rng(2)
    requests = [(record, generation_request(record.report, record_attributes(record), rng,
                                            state_probability=index % 2))
                for index, record in enumerate(r for r in held_out if r.heart_rate)]
    requests = requests[:2 if quick else 6]
    errors = {"model": [], "regex": [], "requests": len(requests)}
    for record, request in requests:
        text = request.turns[-1][1]
        for source in ("model", "regex"):
            override = regex_conditions(text) if source == "regex" else {}
            turn = unified.chat(text, steps=50, **override)
            if turn.generated_ecg is not None:
                errors[source].append(abs(heart_rate_bpm(turn.generated_ecg, turn.sample_rate)
                                          - record.heart_rate))
    return errors
