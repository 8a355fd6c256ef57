"""Config files: `configs/<name>.py:<variant>` plus `--config.a.b=value` overrides.

Every config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`; `arg` selects a
preset (`tiny`, `llama2_7b`, ...). The loaded config is locked, so a mistyped override key is an error
that names the key and the file instead of silently creating a new field.

The fields of the model and train groups are declared once, by frozen dataclasses
(`uniecg_jax.models.schema.ConfigSchema`: `LLMConfig`, `UNetConfig`, ...,
`train.schema.TrainConfig`); config files derive their groups from them. A checkpoint's config.json
written by an older version is brought up to date by `upgrade_config` (the `MIGRATIONS` table) when
it is read.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

from uniecg_jax.errors import ConfigError

__all__ = ["ConfigError", "MIGRATIONS", "apply_override", "config_from_json", "config_to_json",
           "load_config", "load_config_file", "replace_values", "split_config_args",
           "upgrade_config"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _resolve_path(spec_path: str) -> str:
    """`configs/llm.py`, `llm.py` or `llm` -> an existing file path."""
    candidates = [spec_path]
    if not spec_path.endswith(".py"):
        candidates.append(spec_path + ".py")
    candidates += [os.path.join(CONFIG_DIR, os.path.basename(c)) for c in list(candidates)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ConfigError(f"config file not found: {spec_path!r} (looked in . and {CONFIG_DIR})")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    path = _resolve_path(path)
    module_name = "uniecg_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except KeyError as e:
        # str(KeyError) is the repr of its message: quotes inside quotes.
        detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ConfigError(f"{path}: unknown preset {arg!r}: {detail}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return config


def _parse_value(raw: str, current: Any, key: str) -> Any:
    """Parses an override string into the type of the field it replaces."""
    if isinstance(current, bool):
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a boolean, got {raw!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected an integer, got {raw!r}") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a number, got {raw!r}") from None
    if isinstance(current, str):
        return raw
    if current is None:
        # Fields that default to None take a Python literal if it parses, else the raw string.
        if raw.lower() == "none":
            return None
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--config.{key}: expected a tuple/list literal, got {raw!r}") from None
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    if isinstance(current, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"--config.{key}: is a group of fields; override its members instead")
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _known_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        full = f"{prefix}{name}"
        keys.append(full)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _known_keys(value, full + ".")
    return keys


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets dotted `key` to `raw` parsed to the existing field's type; unknown keys raise."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            close = difflib.get_close_matches(key, _known_keys(config), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key --config.{key}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    value = _parse_value(raw, current, key)
    try:
        node[parts[-1]] = value
    except (TypeError, AttributeError, KeyError) as e:
        raise ConfigError(f"--config.{key}={raw}: {e}") from None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file and applies `a.b=value` overrides; returns a locked ConfigDict.

    Args:
      spec: `configs/stage1.py:tiny` (the directory and `.py` may be omitted).
      overrides: strings `model.num_layers=4` (a leading `--config.` is accepted and stripped).
    """
    config = load_config_file(spec)
    config.lock()
    for item in overrides:
        item = item[len("--config."):] if item.startswith("--config.") else item
        item = item[len("config."):] if item.startswith("config.") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        apply_override(config, key.strip(), raw)
    return config


def replace_values(config: ml_collections.ConfigDict, changes: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
    """A NEW locked config: `config` with each dotted key of `changes` set (a mapping value replaces
    a whole group); `config` itself is not touched. Every key must exist already, so a typo is an
    error rather than a new field. Finalisation (vocabulary sizes, token ids, phase steps) uses this
    instead of unlocking and rewriting a locked config."""
    values = config.to_dict()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"replace_values: no config group {key.rsplit('.', 1)[0]}")
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"replace_values: unknown config key {key}")
        node[leaf] = value.to_dict() if hasattr(value, "to_dict") else value
    updated = ml_collections.ConfigDict(values)
    updated.lock()
    return updated


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from other CLI arguments."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg)
            elif i + 1 < len(argv):
                overrides.append(f"{arg}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """Serialises a config (for checkpoints); tuples become lists."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# How configs written by older versions (a checkpoint's config.json) differ from today's, oldest
# first: (dotted key, objectives it applies to (None = all), action, why). `drop` removes the key;
# `add:<json>` sets a key the older version did not write to the value that version behaved as.
MIGRATIONS: tuple[tuple[str, tuple[str, ...] | None, str, str], ...] = (
    # Diffusion configs before the objective registry / data layer (were patched at train time by
    # train/diffusion.py's TRAINING_DEFAULTS, removed in the config redesign, issue 13).
    ("objective", ("diffusion",), 'add:"diffusion"', "diffusion configs before `objective`"),
    ("data.source", ("diffusion",), 'add:"bundled"', "before prep folders"),
    ("data.num_synthetic", ("diffusion",), "add:16", "before synthetic ECGs were configurable"),
    ("data.synthetic_heart_rates", ("diffusion",), "add:[45.0, 60.0, 75.0, 90.0, 105.0, 120.0]",
     "before synthetic ECGs were configurable"),
    ("data.cache_dir", ("diffusion",), 'add:""', "before the synthetic cache was configurable"),
    ("data.worker_count", ("diffusion",), "add:0", "before grain workers were configurable"),
    # Stage 1/2 declared a z-loss weight that no loss read (issue 13): removed, not implemented.
    ("train.z_loss", ("stage1", "stage2"), "drop", "stage 1/2 never read train.z_loss"),
)


def _objective_of(values: dict) -> str | None:
    """The objective a config.json was written for (diffusion configs may predate `objective`)."""
    if "objective" in values:
        return values["objective"]
    model = values.get("model")
    return "diffusion" if isinstance(model, dict) and "unet" in model and "vae" in model else None


def upgrade_config(values: dict) -> dict:
    """A copy of a config dict (a checkpoint's config.json) with `MIGRATIONS` applied: keys removed
    since it was written are dropped, keys added since are set to the value the old version used."""
    values = json.loads(json.dumps(values))
    objective = _objective_of(values)
    for key, objectives, action, _ in MIGRATIONS:
        if objectives is not None and objective not in objectives:
            continue
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if action == "drop":
            node.pop(leaf, None)
        elif action.startswith("add:") and leaf not in node:
            node[leaf] = json.loads(action[len("add:"):])
    return values


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json` (lists stay lists), upgraded by `upgrade_config`; locked."""
    config = ml_collections.ConfigDict(upgrade_config(json.loads(text)))
    config.lock()
    return config
