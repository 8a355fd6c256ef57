"""Decoder-LLM config: conversion, dry runs and plain language-model training.

  uniecg convert from-hf --hf-dir /ckpt/vicuna-7b --out /ckpt/vicuna-orbax --config configs/llm.py:vicuna_7b
  uniecg dry-run --config configs/llm.py:llama2_7b --devices 8 --config.mesh.fsdp=8
  uniecg train --config configs/llm.py:tiny --workdir /tmp/lm

Variants: tiny (CPU), small (~60M), llama2_7b, vicuna_7b, llama3_8b, qwen2_5_7b, qwen2_5_0_5b.
"""
import ml_collections

from uniecg_jax.models import presets
from uniecg_jax.train.schema import LMTrainConfig, train_group

VARIANTS = ("tiny", "small", "llama2_7b", "vicuna_7b", "llama3_8b", "qwen2_5_7b", "qwen2_5_0_5b")


def get_config(arg=None):
    variant = arg or "tiny"
    config = ml_collections.ConfigDict()
    config.objective = "lm"         # trainer: uniecg_jax.train.TRAINERS["lm"]
    config.model = presets.llm(variant)
    config.mesh = presets.mesh()
    config.distributed = False      # call jax.distributed.initialize() (multi-host pods)
    config.seed = 0
    config.train = train_group(LMTrainConfig(weight_decay=0.01, b2=0.95, checkpoint_every=50))
    config.init = ml_collections.ConfigDict(dict(hf_dir=""))
    if variant not in ("tiny",):
        config.model.dtype = "bfloat16"
        config.train.batch_size = 256
        config.train.seq_len = 2048
    return config
