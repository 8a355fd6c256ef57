"""`uniecg train --config configs/<x>.py:<variant> --workdir DIR [--config.a.b=v ...]`.

Trains the config's `objective` (see `uniecg_jax.train.TRAINERS`; every phase of a multi-phase one,
such as diffusion's VAE then UNet, each in DIR/<phase>), exports the servable model, and resumes
automatically from the newest checkpoint in DIR. SIGTERM saves a final checkpoint and exits with
status 0, so a preempted job simply runs the same command again.
"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model (resumes from the newest checkpoint in --workdir)",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--config", required=True, help="configs/<file>.py:<variant>")
    parser.add_argument("--workdir", required=True, help="checkpoints and metrics.jsonl go here")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from uniecg_jax.config import load_config
    from uniecg_jax.train import build_task
    from uniecg_jax.train.loop import run as run_task

    config = load_config(args.config, args.config_overrides)
    result = run_task(config, args.workdir, build_task(config))
    return 0 if result.stopped_by_signal in (None, "SIGTERM") else 1
