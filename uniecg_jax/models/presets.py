"""Model-shape presets shared by every config file (configs/*.py call these).

Shapes follow the Hugging Face configs of the named checkpoints, so `uniecg convert from-hf` on such a
checkpoint matches the preset exactly.
"""
from __future__ import annotations

import ml_collections


def rope_scaling(kind: str = "none", factor: float = 1.0, low_freq_factor: float = 1.0,
                 high_freq_factor: float = 4.0, original_max_position_embeddings: int = 8192
                 ) -> ml_collections.ConfigDict:
    """HF `rope_scaling`: kind is `none`, `linear`, `dynamic` or `llama3`."""
    return ml_collections.ConfigDict(dict(
        kind=kind, factor=float(factor), low_freq_factor=float(low_freq_factor),
        high_freq_factor=float(high_freq_factor),
        original_max_position_embeddings=int(original_max_position_embeddings)))


def llm(name: str) -> ml_collections.ConfigDict:
    """Decoder-LLM shape preset: `tiny`, `small` (~60M, benchmarks), `llama2_7b`, `vicuna_7b`,
    `llama3_8b`, `qwen2_5_7b`, `qwen2_5_0_5b`."""
    base = dict(
        family="llama",            # llama | qwen2 (qwen2 = q/k/v biases)
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=0,                # 0 = hidden_size // num_heads
        rope_theta=10000.0,
        rope_scaling=rope_scaling(),
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attention_bias=False,      # q/k/v biases (Qwen2)
        param_dtype="float32",     # master weights
        dtype="float32",           # compute dtype (bfloat16 for training at scale)
        remat="none",              # none | full | dots_saveable | dots_with_no_batch_dims_saveable
        scan_layers=False,         # stack layers with nn.scan (faster compiles for deep models)
        attention_query_chunk=128,  # cache-less causal attention in query chunks (0 = dense [T, T])
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    presets = {
        "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=1024),
        "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8,
                      num_heads=8, num_kv_heads=8, max_position_embeddings=2048),
        "llama2_7b": dict(),
        "vicuna_7b": dict(),
        "llama3_8b": dict(vocab_size=128256, intermediate_size=14336, num_kv_heads=8,
                          rope_theta=500000.0, max_position_embeddings=131072,
                          bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
                          rope_scaling=rope_scaling("llama3", 8.0, 1.0, 4.0, 8192)),
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
    if name not in presets:
        raise KeyError(f"unknown LLM preset {name!r}; choose from {sorted(presets)}")
    config = ml_collections.ConfigDict(base)
    config.update(presets[name])
    return config


def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device-mesh degrees over axes (data, fsdp, tensor); one may be -1 = "all remaining devices"."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
