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
import time


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


def run(args) -> int:
    # Imported here, not at the top: `uniecg --help` must not pay for jax and the models.
    from uniecg_jax.demo import diffusion as diffusion_demo, stage1 as stage1_demo, \
        stage2 as stage2_demo

    started = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    stage1_dir = os.path.join(workdir, "stage1")
    diffusion_dir = os.path.join(workdir, "diffusion")
    print(f"== uniecg demo: workdir {workdir}")

    print("== stage 1: ECG -> text (tiny UniECG on bundled + synthetic ECGs), then held-out records "
          "vs trivial baselines")
    overrides = list(args.config_overrides)
    if args.stage1_steps is not None:
        overrides.append(f"train.steps={args.stage1_steps}")
    if args.num_synthetic is not None:
        overrides.append(f"data.num_synthetic={args.num_synthetic}")
    lines = stage1_demo.run_demo(stage1_dir, quick=args.quick, overrides=overrides)
    if lines is None:
        return 1
    _print(lines)

    print("== diffusion: text (+ sex, age, heart rate) -> ECG")
    _print(diffusion_demo.run_demo(diffusion_dir, quick=args.quick))

    print("== stage 2: [ECG] tokens aligned to the diffusion text space; one model, both tasks")
    _print(stage2_demo.run_demo(os.path.join(workdir, "stage2"), stage1_dir, diffusion_dir,
                                quick=args.quick))
    print(f"== demo done in {time.perf_counter() - started:.0f} s")
    return 0


def _print(lines) -> None:
    for line in lines:
        print(line)
