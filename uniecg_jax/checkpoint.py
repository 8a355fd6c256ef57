"""The model-checkpoint format used by `uniecg convert`, interpretation and export.

A model checkpoint is a directory:

    <dir>/params/        Orbax (StandardCheckpointer) checkpoint of the param pytree
    <dir>/config.json    the full ConfigDict (`config_to_json`); the LLM fields live under `model`
    <dir>/tokenizer/     a copy of the tokenizer files (optional)

    save_model(directory, params, config, tokenizer_dir=None)
    params, config = restore_model(directory, abstract_params=None)

`abstract_params` (ShapeDtypeStructs with `.sharding`, e.g. from `sharding.abstract_sharded_params`)
makes Orbax restore each array straight onto its sharding. Shapes are checked against the stored
metadata first: a missing or wrong-shaped tensor raises `CheckpointError` naming it and both shapes.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from uniecg_jax.config import config_from_json, config_to_json
from uniecg_jax.data.tokenizer import copy_tokenizer_files
from uniecg_jax.errors import CheckpointError
from uniecg_jax.layers.params import path_name

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
MODEL_SUBDIR = "model"  # where `uniecg train` exports the final model inside a workdir


def _flatten(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(path): leaf for path, leaf in leaves}


def save_model(directory: str, params: Any, config: ml_collections.ConfigDict,
               tokenizer_dir: str | None = None) -> str:
    """Writes params (Orbax), config.json and a tokenizer copy into `directory` (overwrites)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_to_json(config))
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, os.path.join(directory, TOKENIZER_DIR))
    return directory


def resolve_model_dir(path: str) -> str:
    """A model checkpoint dir (has config.json), or a train workdir holding one in `model/`."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    nested = os.path.join(path, MODEL_SUBDIR)
    if os.path.isfile(os.path.join(nested, CONFIG_FILE)):
        return nested
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raise CheckpointError(f"{path}: not a model checkpoint (no {CONFIG_FILE}) and not a train "
                          f"workdir with an exported {MODEL_SUBDIR}/ (train to completion first)")


def load_model_config(directory: str) -> ml_collections.ConfigDict:
    """The config stored with a model checkpoint (locked ConfigDict)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; {directory} is not a uniecg model checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            return config_from_json(f.read())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                              f"{e.msg}); the checkpoint's config is damaged") from None
    except (UnicodeDecodeError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a uniecg config ({e})") from None


# What each kind of model checkpoint is, and the command that uses it.
CHECKPOINT_KINDS = {
    "stage1": ("a stage-1 (ECG interpretation) checkpoint", "uniecg interpret"),
    "stage2": ("a stage-2 (unified interpret + generate) checkpoint", "uniecg chat"),
    "diffusion": ("a diffusion (text -> ECG) checkpoint", "uniecg generate"),
    "llm": ("a plain LLM checkpoint (no ECG encoder)", "train stage 1 from it: uniecg train"),
}


def checkpoint_kind(config: ml_collections.ConfigDict) -> str:
    """"stage1", "stage2", "diffusion", "llm" or "unknown", from a checkpoint's config.model."""
    model = config.get("model", None)
    keys = set(model.keys()) if isinstance(model, ml_collections.ConfigDict) else set()
    if {"unet", "vae"} <= keys:
        return "diffusion"
    if {"llm", "ecg_encoder"} <= keys:
        return "stage2" if {"ecg_token_ids", "alignment"} <= keys else "stage1"
    if {"hidden_size", "num_layers"} & keys or "vocab_size" in keys:
        return "llm"
    return "unknown"


def load_checked_config(path: str, wanted: str, command: str
                        ) -> tuple[str, ml_collections.ConfigDict]:
    """(model dir, config) of the checkpoint at `path` (a model dir or a train workdir), after
    checking it is a `wanted` checkpoint (see `require_kind`); nothing heavy is loaded."""
    directory = resolve_model_dir(path)
    config = load_model_config(directory)
    require_kind(directory, config, wanted, command)
    return directory, config


def require_kind(directory: str, config: ml_collections.ConfigDict, wanted: str,
                 command: str) -> None:
    """Raises CheckpointError unless `config` is a `wanted` checkpoint, naming what was found and
    what to do with it: e.g. "this is a stage-2 ... checkpoint: use `uniecg chat`"."""
    found = checkpoint_kind(config)
    if found == wanted:
        return
    need = CHECKPOINT_KINDS[wanted][0]
    if found == "unknown":
        raise CheckpointError(f"{directory}: `{command}` needs {need}, but config.json describes "
                              "no known model (no model.llm/ecg_encoder nor model.unet/vae)")
    what, use = CHECKPOINT_KINDS[found]
    hint = f"use `{use}`" if use.startswith("uniecg ") else use
    raise CheckpointError(f"{directory}: this is {what}: {hint}; `{command}` needs {need}")


def tokenizer_path(directory: str) -> str | None:
    """`<directory>/tokenizer` when the checkpoint carries a tokenizer, else None."""
    path = os.path.join(directory, TOKENIZER_DIR)
    return path if os.path.isdir(path) else None


def stored_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{'a/b/kernel': (shape, dtype)} of the stored params, from Orbax metadata (no data read)."""
    params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: missing; {directory} is not a uniecg model checkpoint")
    metadata = ocp.StandardCheckpointer().metadata(params_dir)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    return {name: (tuple(m.shape), m.dtype) for name, m in _flatten(tree).items()}


def restore_model(directory: str, abstract_params: Any = None) -> tuple[Any, ml_collections.ConfigDict]:
    """Restores (params, config). With `abstract_params` every array lands on its `.sharding` and
    in its dtype; without, params are restored as stored onto the default device."""
    directory = os.path.abspath(directory)
    config = load_model_config(directory)
    stored = stored_shapes(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if abstract_params is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        metadata = ocp.StandardCheckpointer().metadata(params_dir)
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        abstract_params = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
    else:
        wanted = _flatten(abstract_params)
        missing = sorted(set(wanted) - set(stored))
        if missing:
            raise CheckpointError(f"{params_dir}: missing tensors {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''}")
        unexpected = sorted(set(stored) - set(wanted))
        if unexpected:
            raise CheckpointError(f"{params_dir}: tensors the model has no place for: "
                                  f"{unexpected[:8]}")
        for name, target in wanted.items():
            if tuple(target.shape) != stored[name][0]:
                raise CheckpointError(f"{params_dir}: tensor {name} is stored with shape "
                                      f"{stored[name][0]} but the model expects "
                                      f"{tuple(target.shape)}")
    params = ocp.StandardCheckpointer().restore(params_dir, abstract_params)
    return params, config
