"""Training: optimizer, sharded train state, the generic train step, Orbax checkpoints and the one
train loop all objectives share.

`TRAINERS` maps a config's `objective` to `"module:function"`; the function takes the config and
returns a `uniecg_jax.train.loop.TrainTask` (its finalised config, tokenizer, export and, for
diffusion, its two phases), which `uniecg_jax.train.loop.run` trains. The `train` group's schema per
objective is `uniecg_jax.train.schema.TRAIN_SCHEMAS`. Modules are imported only when their objective
is used, so `uniecg train` for the LM never imports the diffusion code. Other trainers register by
adding a line here.
"""
from __future__ import annotations

import importlib
from typing import Any

from uniecg_jax.config import ConfigError

TRAINERS: dict[str, str] = {
    "lm": "uniecg_jax.train.lm:build_task",
    "stage1": "uniecg_jax.train.stage1:build_task",
    "stage2": "uniecg_jax.train.stage2:build_task",
    "diffusion": "uniecg_jax.train.diffusion:build_task",
    "vision": "uniecg_jax.train.vision:build_task",
}


def build_task(config: Any):
    """The TrainTask for `config.objective` (a ConfigError naming the known objectives otherwise)."""
    objective = config.get("objective", None)
    if objective not in TRAINERS:
        raise ConfigError(f"config.objective={objective!r} has no trainer; known: {sorted(TRAINERS)}")
    module_name, _, function_name = TRAINERS[objective].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"config.objective={objective!r}: trainer module {module_name} is not "
                             "available in this version") from None
        raise
    return getattr(module, function_name)(config)
