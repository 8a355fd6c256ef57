"""The stage-1 part of `uniecg demo`: train a tiny UniECG (ECG encoder + projectors + LLM) on
grounded conversations about the bundled records plus synthetic ECGs, then interpret the held-out
records and score them against trivial baselines.

    lines = run_demo("/tmp/demo/stage1", quick=True)
"""
from __future__ import annotations

import os
from typing import Sequence

from uniecg_jax.config import load_config
from uniecg_jax.eval import interpret_eval
from uniecg_jax.inference.interpret import Interpreter
from uniecg_jax.train import build_task
from uniecg_jax.train.loop import train

QUICK_OVERRIDES = ("train.steps=4", "train.log_every=2", "data.num_synthetic=4",
                   "eval.max_new_tokens=16", "train.checkpoint_every=0")


def run_demo(workdir: str, quick: bool = False, overrides: Sequence[str] = ()) -> list[str] | None:
    """Trains (or resumes) configs/stage1.py:demo in `workdir`, exports the model there and
    evaluates it on the held-out bundled records. Returns printable lines, or None when training
    was stopped by a signal (rerun to resume)."""
    config = load_config("configs/stage1.py:demo",
                         (list(QUICK_OVERRIDES) if quick else []) + list(overrides))
    task = build_task(config)
    result = train(config, workdir, task)
    if result.stopped_by_signal:
        return None
    task.export(workdir, result.state.params)

    interpreter = Interpreter.load(workdir)
    items = interpret_eval.items_from_records(
        interpret_eval.load_eval_records("bundled", interpreter.config))
    out = os.path.join(os.path.dirname(os.path.abspath(workdir)), "eval_interpret", "results.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for stale in (out, out + ".part-0-of-1", out + ".part-0-of-1.done"):
        if os.path.exists(stale) and result.steps_run:
            os.remove(stale)  # the model changed: old generations are not its answers
    interpret_eval.run_shard(interpreter, items, out, process_index=0, process_count=1,
                             batch_size=int(config.eval.batch_size), progress=False)
    metrics = interpret_eval.merge(out, 1, items)
    example = interpret_eval.read_part(out + ".part-0-of-1")[items[0].record_id]
    lines = [f"example held-out record {items[0].record_id}:",
             f"  generated: {example['generated']}",
             f"  reference: {example['reference'] or example['reference_labels']}",
             f"interpretation on {len(items)} held-out records:"]
    lines += ["  " + line for line in interpret_eval.summary_lines(metrics)]
    lines.append(f"interpretation details in {out}.metrics.json")
    return lines
