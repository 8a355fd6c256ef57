"""Rotary position embeddings (RoPE) in Hugging Face's `rotate_half` layout, with HF's rope-scaling
variants `linear`, `dynamic` (dynamic NTK) and `llama3`.

The inverse frequencies reproduce `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS` step by step
in float32 (same operation order), so logits match HF to ~1e-6. HF checkpoints store q/k projections
for the rotate_half layout (first half / second half of each head pair up), so conversion needs no
permutation of q/k rows.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """theta and HF `rope_scaling` (kind: none | linear | dynamic | llama3)."""
    head_dim: int
    theta: float = 10000.0
    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.kind not in ("none", "default", "linear", "dynamic", "llama3"):
            raise ValueError(f"rope_scaling kind {self.kind!r} is not supported "
                             "(none | linear | dynamic | llama3)")


def _exponents(head_dim: int) -> np.ndarray:
    # torch.arange(0, dim, 2, dtype=int64).float() / dim, in float32 like HF.
    return (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim))


def static_inv_freq(rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32) for every kind except the dynamic update."""
    base = np.float32(rope.theta)
    inv_freq = (np.float32(1.0) / (base ** _exponents(rope.head_dim))).astype(np.float32)
    if rope.kind == "linear":
        inv_freq = (inv_freq / np.float32(rope.factor)).astype(np.float32)
    elif rope.kind == "llama3":
        factor = rope.factor
        old_context_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_context_len / rope.low_freq_factor
        high_freq_wavelen = old_context_len / rope.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = ((old_context_len / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def inv_freq_for(rope: RopeConfig, positions: jax.Array) -> jax.Array:
    """Inverse frequencies [head_dim // 2]; `dynamic` grows theta from the longest sequence in
    `positions` (HF uses max(position_ids) + 1 over the batch; below max_position_embeddings it is
    the unscaled set)."""
    if rope.kind != "dynamic":
        return jnp.asarray(static_inv_freq(rope))
    dim = rope.head_dim
    max_pos = rope.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, float(max_pos))
    base = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** jnp.asarray(_exponents(dim)))


def rope_cos_sin(rope: RopeConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> (cos, sin), each [B, T, head_dim] in `dtype`."""
    inv_freq = inv_freq_for(rope, positions)
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, Dh], cos/sin [B, T, Dh] -> rotated x [B, T, H, Dh]."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
