"""First- and second-call wall time of `uniecg interpret` on the demo-size stage-1 model.

  python bench/interpret.py [--config configs/stage1.py:demo] [--calls 2] [--max-new-tokens 16]

Builds the model of `--config` with random weights, exports it as a stage-1 checkpoint (what
`uniecg demo` writes; the weights do not change the time), then runs `uniecg interpret --ckpt ...
--ecg <a bundled record>` as separate processes, as a user would: the first with an empty cache
home (`UNIECG_CACHE`: nothing compiled yet), the later ones reusing it (the persistent
compilation cache). Target (issue 15): the second call under 5 s. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_SECOND_CALL_S = 5.0


def export_random_stage1(config_spec: str, workdir: str) -> str:
    """A stage-1 checkpoint of `config_spec` with random weights in `workdir/model`."""
    import flax.linen as nn
    import jax

    from uniecg_jax.config import load_config
    from uniecg_jax.inference.interpret import export_model
    from uniecg_jax.train import build_task
    from uniecg_jax.train.stage1 import resolve_tokenizer

    config = load_config(config_spec)
    task = build_task(config)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    tokenizer, _ = resolve_tokenizer(config)
    return export_model(workdir, params, task.config, tokenizer)


def timed_call(argv: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/stage1.py:demo")
    parser.add_argument("--calls", type=int, default=2, help="calls after building (>= 2)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    from uniecg_jax.data import bundled_record_paths

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = export_random_stage1(args.config, os.path.join(scratch, "stage1"))
        env = dict(os.environ, UNIECG_CACHE=os.path.join(scratch, "cache"),
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # The `uniecg` console script's entry point, run from this checkout.
        argv = [sys.executable, "-c", "import sys; from uniecg_jax.cli import main; "
                "sys.exit(main())", "interpret", "--ckpt", model_dir,
                "--ecg", bundled_record_paths()[0], "--max-new-tokens", str(args.max_new_tokens)]
        times = [timed_call(argv, env)[0] for _ in range(max(2, args.calls))]
    import platform
    result = dict(config=args.config, first_call_s=round(times[0], 2),
                  second_call_s=round(times[1], 2), later_calls_s=[round(t, 2) for t in times[2:]],
                  target_second_call_s=TARGET_SECOND_CALL_S,
                  second_call_within_target=times[1] < TARGET_SECOND_CALL_S,
                  cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
