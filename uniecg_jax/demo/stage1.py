"""The stage-1 part of `uniecg demo`: train a tiny UniECG (ECG encoder + projectors + LLM) on
grounded conversations about the bundled records plus synthetic ECGs, then interpret the held-out
records and score them against trivial baselines. Then the same with an image tower
(configs/stage1.py:demo_image, modality dropout) over two seeds, scored per input kind (the signal,
the page rendered from it, both) against the baselines, with the spread over the seeds. As GEM's
CLIP tower, the image tower comes pretrained and stays frozen: per seed, configs/vision.py:demo
first fits it to the training pages (`train.vision`).

    lines = run_demo("/tmp/demo/stage1", quick=True)
"""
from __future__ import annotations

import os
from typing import Sequence

from uniecg_jax.config import load_config
from uniecg_jax.eval import interpret_eval
from uniecg_jax.inference.interpret import Interpreter
from uniecg_jax.train import build_task
from uniecg_jax.train.loop import run, train
from uniecg_jax.train.vision import held_out_page_metrics

QUICK_OVERRIDES = ("train.steps=4", "train.log_every=2", "data.num_synthetic=4",
                   "eval.max_new_tokens=16", "train.checkpoint_every=0")
IMAGE_SPEC = "configs/stage1.py:demo_image"
TOWER_SPEC = "configs/vision.py:demo"    # the image tower's pretraining (same data and seed)
QUICK_TOWER_OVERRIDES = ("train.steps=4", "train.log_every=2", "data.num_synthetic=4",
                         "train.checkpoint_every=0")
# Stage 1 starts from the pretrained tower and keeps it fixed, as GEM keeps its CLIP.
FROZEN_TOWER = ("model.vision_tower.frozen=True", "train.freeze=^vision_tower/")
IMAGE_SEEDS = (0, 1)        # the image demo's seeds (`config.seed`: init, data order, synthetic)
QUICK_IMAGE_SEEDS = (0,)
# (name, metrics path, higher is better) of the demo's per-kind comparison with the baselines.
HEADLINE = (("micro F1", ("diagnosis", "micro", "f1"), True),
            ("macro F1", ("diagnosis", "macro", "f1"), True),
            ("HR MAE", ("measurements", "heart_rate", "mae"), False))


def train_and_evaluate(spec: str, workdir: str, out: str, quick: bool,
                       overrides: Sequence[str]) -> tuple[dict, list, str] | None:
    """Trains (or resumes) `spec` in `workdir`, exports the model there and evaluates it on the
    held-out bundled records into `out` (per input kind with an image tower). Returns (metrics,
    items, out), or None when training was stopped by a signal (rerun to resume)."""
    config = load_config(spec, (list(QUICK_OVERRIDES) if quick else []) + list(overrides))
    task = build_task(config)
    result = train(config, workdir, task)
    if result.stopped_by_signal:
        return None
    task.export(workdir, result.state.params)

    interpreter = Interpreter.load(workdir)
    items = interpret_eval.items_from_records(
        interpret_eval.load_eval_records("bundled", interpreter.config))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    part = interpret_eval.part_path(out, 0, 1)
    for stale in (out, part, part + ".done", part + ".job.json"):
        if os.path.exists(stale) and result.steps_run:
            os.remove(stale)  # the model changed: old generations are not its answers
    interpret_eval.run_shard(interpreter, items, out, process_index=0, process_count=1,
                             batch_size=int(config.eval.batch_size), progress=False)
    return interpret_eval.merge(out, 1, items), items, out


def run_demo(workdir: str, quick: bool = False, overrides: Sequence[str] = (),
             image: bool = True) -> list[str] | None:
    """Trains and evaluates configs/stage1.py:demo in `workdir` (the model stage 2 builds on),
    then, with `image`, `run_image_demo` beside it (`<workdir>_image/`). Returns printable lines,
    or None when training was stopped by a signal (rerun to resume)."""
    root = os.path.dirname(os.path.abspath(workdir))
    done = train_and_evaluate("configs/stage1.py:demo", workdir,
                              os.path.join(root, "eval_interpret", "results.jsonl"), quick,
                              overrides)
    if done is None:
        return None
    metrics, items, out = done
    example = interpret_eval.read_part(out + ".part-0-of-1")[items[0].record_id]
    lines = [f"example held-out record {items[0].record_id}:",
             f"  generated: {example['generated']}",
             f"  reference: {example['reference'] or example['reference_labels']}",
             f"interpretation on {len(items)} held-out records:"]
    lines += ["  " + line for line in interpret_eval.summary_lines(metrics)]
    lines.append(f"interpretation details in {out}.metrics.json")
    if not image:
        return lines
    image_lines = run_image_demo(os.path.abspath(workdir) + "_image", quick, overrides)
    return None if image_lines is None else lines + image_lines


def pretrain_tower(workdir: str, quick: bool, overrides: Sequence[str], seed: int
                   ) -> tuple[str, dict] | None:
    """Trains (or resumes) `TOWER_SPEC` in `workdir` on the training pages of the stage-1 run with
    the same `seed` and data overrides (so it never sees that run's held-out records); returns
    the exported HF CLIP vision directory and `train.vision.held_out_page_metrics`, or None when
    stopped by a signal."""
    data = [item for item in overrides if item.removeprefix("--config.").startswith("data.")]
    config = load_config(TOWER_SPEC, (list(QUICK_TOWER_OVERRIDES) if quick else []) + data
                         + [f"seed={seed}"])
    task = build_task(config)
    result = run(config, workdir, task)
    if result.model_dir is None:
        return None
    return result.model_dir, held_out_page_metrics(task.config, result.last.state.params)


def run_image_demo(root: str, quick: bool = False, overrides: Sequence[str] = (),
                   seeds: Sequence[int] | None = None) -> list[str] | None:
    """Per seed: the image tower pretrained on the training pages (`root/tower_seed{N}/`), then
    configs/stage1.py:demo_image on it, frozen (`root/seed{N}/`), evaluated per input kind
    (`root/eval_seed{N}/`); returns `image_summary_lines`, or None when training was stopped by
    a signal."""
    seeds = tuple(seeds or (QUICK_IMAGE_SEEDS if quick else IMAGE_SEEDS))
    per_seed, tower_lines = {}, []
    for seed in seeds:
        pretrained = pretrain_tower(os.path.join(root, f"tower_seed{seed}"), quick, overrides,
                                    seed)
        if pretrained is None:
            return None
        tower, pages = pretrained
        tower_lines.append(
            f"seed {seed}: {pages['num_records']} held-out pages, heart rate MAE "
            f"{pages['heart_rate_mae']:.2f} bpm (training mean: "
            f"{pages['heart_rate_mae_constant']:.2f}), statement micro F1 "
            f"{pages['statement_micro_f1']:.3f} (the most common statement: "
            f"{pages['statement_micro_f1_common']:.3f})")
        done = train_and_evaluate(IMAGE_SPEC, os.path.join(root, f"seed{seed}"),
                                  os.path.join(root, f"eval_seed{seed}", "results.jsonl"), quick,
                                  list(overrides) + [f"seed={seed}", f"init.clip_dir={tower}",
                                                     *FROZEN_TOWER])
        if done is None:
            return None
        per_seed[seed] = done[0]
    lines = [f"with an image tower ({IMAGE_SPEC}, modality dropout; the tower pretrained by "
             f"{TOWER_SPEC} and frozen), held-out records per input kind, "
             f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}:"]
    lines += ["  " + line for line in image_summary_lines(per_seed)]
    lines.append(f"the image tower alone (its pretraining head), {TOWER_SPEC}:")
    lines += ["  " + line for line in tower_lines]
    lines.append(f"details in {root}/eval_seed*/results.jsonl.metrics.json")
    return lines


def _value(metrics: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        metrics = metrics[key]
    return None if metrics is None else float(metrics)


def image_summary_lines(per_seed: dict[int, dict]) -> list[str]:
    """Per input kind and headline metric: each seed's value against that seed's trivial baseline
    (the held-out synthetic records follow the seed), the mean and the spread (max - min) over the
    seeds, and whether the model beat the baseline on every seed."""
    kinds = list(next(iter(per_seed.values()))["by_kind"])
    lines = []
    for kind in kinds:
        parts, wins = [], True
        for name, path, higher in HEADLINE:
            values = [_value(m["by_kind"][kind], path) for m in per_seed.values()]
            bases = [_value(m["baseline"], path) for m in per_seed.values()]
            beats = [v is not None and b is not None and (v > b if higher else v < b)
                     for v, b in zip(values, bases)]
            wins &= all(beats)
            shown = " / ".join("n/a" if v is None else f"{v:.3f}" for v in values)
            if len(values) > 1 and None not in values:
                shown += f" (mean {sum(values) / len(values):.3f}, spread " \
                         f"{max(values) - min(values):.3f})"
            base = " / ".join("n/a" if b is None else f"{b:.3f}" for b in bases)
            parts.append(f"{name} {shown} vs baseline {base}")
        lines.append(f"{kind:>6}: " + "; ".join(parts) +
                     f" -> {'beats' if wins else 'does NOT beat'} the baselines on every seed")
    return lines
