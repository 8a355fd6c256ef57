"""Model-shape presets shared by every config file (configs/*.py call these).

Shapes follow the Hugging Face configs of the named checkpoints, so `uniecg convert from-hf` on such a
checkpoint matches the preset exactly.
"""
from __future__ import annotations

import ml_collections

from uniecg_jax.models.llm import LLMConfig, RopeScaling

# Fields that differ from the `LLMConfig` defaults (the Llama-2-7B shape) per preset.
LLM_PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=1024),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8,
                  num_heads=8, num_kv_heads=8, max_position_embeddings=2048),
    "llama2_7b": dict(),
    "vicuna_7b": dict(),
    "llama3_8b": dict(vocab_size=128256, intermediate_size=14336, num_kv_heads=8,
                      rope_theta=500000.0, max_position_embeddings=131072,
                      bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
                      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),
    "qwen2_5_7b": dict(family="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                       attention_bias=True, bos_token_id=151643, eos_token_id=151645,
                       pad_token_id=151643),
    "qwen2_5_0_5b": dict(family="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                         rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=32768, attention_bias=True,
                         tie_word_embeddings=True, bos_token_id=151643,
                         eos_token_id=151645, pad_token_id=151643),
}


def rope_scaling(kind: str = "none", factor: float = 1.0, low_freq_factor: float = 1.0,
                 high_freq_factor: float = 4.0, original_max_position_embeddings: int = 8192
                 ) -> ml_collections.ConfigDict:
    """HF `rope_scaling` group (`RopeScaling`): kind is `none`, `linear`, `dynamic` or `llama3`."""
    return ml_collections.ConfigDict(RopeScaling(
        kind, float(factor), float(low_freq_factor), float(high_freq_factor),
        int(original_max_position_embeddings)).to_dict())


def llm(name: str) -> ml_collections.ConfigDict:
    """Decoder-LLM `model` group (every `LLMConfig` field) of a preset: `tiny`, `small` (~60M,
    benchmarks), `llama2_7b`, `vicuna_7b`, `llama3_8b`, `qwen2_5_7b`, `qwen2_5_0_5b`."""
    if name not in LLM_PRESETS:
        raise KeyError(f"unknown LLM preset {name!r}; choose from {sorted(LLM_PRESETS)}")
    return ml_collections.ConfigDict(LLMConfig(**LLM_PRESETS[name]).to_dict())


def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device-mesh degrees over axes (data, fsdp, tensor); one may be -1 = "all remaining devices"."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
