"""Tiny random Hugging Face models and tokenizers for tests and benchmarks (needs torch; no hub).

    model, hf_dir = tiny_hf_model("llama", tmp_path, num_key_value_heads=2, head_dim=12)
"""
from __future__ import annotations

import os
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers

TINY_SHAPES = dict(vocab_size=96, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(family: str, **overrides: Any):
    """LlamaConfig / Qwen2Config with tiny shapes; `overrides` replace any field."""
    import transformers  # heavy; these HF-side test fixtures are the only users here
    fields = dict(TINY_SHAPES)
    fields.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    return cls(**fields)


def tiny_hf_model(family: str, directory: str | os.PathLike | None = None, seed: int = 0,
                  max_shard_size: str | None = None, **overrides: Any):
    """A random `LlamaForCausalLM` / `Qwen2ForCausalLM` in float32 eval mode, saved to `directory`
    (safetensors; sharded with an index when `max_shard_size` is given) if one is given.

    Norm weights and q/k/v biases are randomised too, so parity tests see every tensor."""
    import torch
    import transformers
    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[family]
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    if directory is not None:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(directory), **kwargs)
    return model


def tiny_tokenizer(directory: str | os.PathLike | None = None, vocab_size: int = 96):
    """A word-level `PreTrainedTokenizerFast` with `vocab_size` entries (`<pad>`=0, `<s>`=1,
    `</s>`=2, `<unk>`=3, then `w4`, `w5`, ...), saved to `directory` if given."""
    import transformers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>")
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer
