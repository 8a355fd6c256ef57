"""`uniecg train --config configs/<x>.py:<variant> --workdir DIR [--config.a.b=v ...]`.

Trains the config's `objective` (see `uniecg_jax.train.TRAINERS`) and resumes automatically from the
newest checkpoint in DIR. SIGTERM saves a final checkpoint and exits with status 0, so a preempted job
simply runs the same command again.
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
    from uniecg_jax.train.loop import train

    config = load_config(args.config, args.config_overrides)
    if config.get("objective") == "diffusion":  # two phases (VAE, then UNet), two workdirs
        from uniecg_jax.train.diffusion import run as run_diffusion
        result = run_diffusion(config, args.workdir)
        return 0 if result.stopped_by_signal in (None, "SIGTERM") else 1
    task = build_task(config)
    result = train(config, args.workdir, task)
    export = getattr(task, "export", None)  # objectives that serve a model write it at the end
    if export is not None and result.stopped_by_signal is None:
        print(f"[{task.name}] exported model to {export(args.workdir, result.state.params)}")
    return 0 if result.stopped_by_signal is None or result.stopped_by_signal == "SIGTERM" else 1
