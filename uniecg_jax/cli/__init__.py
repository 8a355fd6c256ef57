"""The `uniecg` command line.

Each subcommand lives in its own module `uniecg_jax/cli/<name>.py`, which defines
`register(subparsers)` (argparse only, no heavy imports) and does its real imports inside the handler,
so `uniecg --help` is instant and one subcommand's dependencies never slow another.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `uniecg --help` lists them. A module that does not exist yet is
# skipped, so the CLI works while later issues add theirs.
SUBCOMMAND_MODULES = (
    "demo", "prep", "train", "dry_run", "interpret", "chat", "generate", "eval", "convert",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniecg", description="UniECG in JAX: interpret 12-lead ECGs and generate them from text.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"uniecg_jax.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"uniecg_jax.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `uniecg` console script."""
    from uniecg_jax.config import ConfigError, split_config_args
    from uniecg_jax.errors import UniECGError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rest, overrides = split_config_args(argv)
    except ConfigError as e:
        print(f"uniecg: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(rest)
    args.config_overrides = overrides
    try:
        result = args.handler(args)
    except ConfigError as e:
        print(f"uniecg: config error: {e}", file=sys.stderr)
        return 2
    except UniECGError as e:
        print(f"uniecg: error: {e}", file=sys.stderr)
        return 1
    return int(result or 0)
