"""`uniecg demo`: the main job at small scale on the bundled default, on a laptop CPU.

1. Stage 1: trains a tiny UniECG (ECG encoder + projectors + LLM) on grounded conversations about
   the bundled real records plus synthetic ECGs with known heart rate (held-out patients excluded).
2. Interprets the held-out records and prints judge-free metrics (diagnosis statement F1, heart-rate
   error, lead coverage) against trivial baselines (always the most common statement, always the
   mean heart rate).
3. Diffusion: trains a tiny DiffuSETS-style VAE + conditional UNet on the same ECGs plus synthetic
   ones at chosen heart rates, generates ECGs at requested rates and prints the heart-rate MAE (QRS
   detection) against the unconditioned baseline.
4. Stage 2: adds `[ECG]` tokens to the stage-1 model and aligns their hidden states with the
   diffusion model's text space; then the single model interprets a held-out ECG and, asked for one,
   generates an ECG through its own `[ECG]` tokens, with both metrics against baselines.

Everything lands in --workdir (default ./runs/demo); rerunning resumes finished stages.
"""
from __future__ import annotations

import os


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train + evaluate a tiny UniECG on bundled samples",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join("runs", "demo"))
    parser.add_argument("--stage1-steps", type=int, default=None,
                        help="stage-1 training steps (default: the demo config's)")
    parser.add_argument("--num-synthetic", type=int, default=None,
                        help="synthetic ECGs added to the bundled records")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few steps (what the tests run)")
    parser.set_defaults(handler=run)


def _stage1_overrides(args) -> list[str]:
    overrides = list(args.config_overrides)
    if args.quick:
        overrides += ["train.steps=4", "train.log_every=2", "data.num_synthetic=4",
                      "eval.max_new_tokens=16", "train.checkpoint_every=0"]
    if args.stage1_steps is not None:
        overrides.append(f"train.steps={args.stage1_steps}")
    if args.num_synthetic is not None:
        overrides.append(f"data.num_synthetic={args.num_synthetic}")
    return overrides


def run(args) -> int:
    import time

    from uniecg_jax.config import load_config
    from uniecg_jax.eval import interpret_eval
    from uniecg_jax.interpret import Interpreter
    from uniecg_jax.train import build_task
    from uniecg_jax.train.loop import train

    started = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    stage1_dir = os.path.join(workdir, "stage1")
    print(f"== uniecg demo: workdir {workdir}")

    print("== stage 1: ECG -> text (tiny UniECG on bundled + synthetic ECGs)")
    config = load_config("configs/stage1.py:demo", _stage1_overrides(args))
    task = build_task(config)
    result = train(config, stage1_dir, task)
    if result.stopped_by_signal:
        return 1
    task.export(stage1_dir, result.state.params)

    print("== stage 1 evaluation: held-out records vs trivial baselines")
    interpreter = Interpreter.load(stage1_dir)
    items = interpret_eval.items_from_records(
        interpret_eval.load_eval_records("bundled", interpreter.config))
    out = os.path.join(workdir, "eval_interpret", "results.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for stale in (out, out + ".part-0-of-1", out + ".part-0-of-1.done"):
        if os.path.exists(stale) and result.steps_run:
            os.remove(stale)  # the model changed: old generations are not its answers
    interpret_eval.run_shard(interpreter, items, out, process_index=0, process_count=1,
                             batch_size=int(config.eval.batch_size), progress=False)
    metrics = interpret_eval.merge(out, 1, items)
    example = interpret_eval.read_part(out + ".part-0-of-1")[items[0].record_id]
    print(f"example held-out record {items[0].record_id}:\n  generated: {example['generated']}\n"
          f"  reference: {example['reference'] or example['reference_labels']}")
    print(f"interpretation on {len(items)} held-out records:")
    for line in interpret_eval.summary_lines(metrics):
        print("  " + line)

    print("== diffusion: text (+ sex, age, heart rate) -> ECG")
    from uniecg_jax.diffusion.demo import run_demo as run_diffusion_demo
    diffusion_dir = os.path.join(workdir, "diffusion")
    for line in run_diffusion_demo(diffusion_dir, quick=args.quick):
        print(line)

    print("== stage 2: [ECG] tokens aligned to the diffusion text space; one model, both tasks")
    from uniecg_jax.stage2_demo import run_demo as run_stage2_demo
    for line in run_stage2_demo(os.path.join(workdir, "stage2"), stage1_dir, diffusion_dir,
                                quick=args.quick):
        print(line)
    print(f"== demo done in {time.perf_counter() - started:.0f} s; interpretation details in "
          f"{out}.metrics.json")
    return 0
