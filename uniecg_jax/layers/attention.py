"""Grouped-query self-attention with RoPE, causal + padding masks and an explicit KV cache.

Cache layout (one layer): `{"k": [B, K, S, Dh], "v": [B, K, S, Dh]}` in the compute dtype (heads
before slots, so the score and context contractions read it without transposing it). The cache
is a plain pytree passed in and returned (no mutable Flax collections), so decode loops can carry it
through `lax.while_loop`. Slot s of the cache holds the token written at step s; the caller supplies
`key_mask [B, S]` (1 = a real token lives in slot s) and `query_offset` (the slot of the first query),
and a query in slot t sees slots s <= t with key_mask == 1.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from uniecg_jax.layers.linear import DenseGeneral, einsum
from uniecg_jax.layers.rope import apply_rope

MASKED_SCORE = float(jnp.finfo(jnp.float32).min)  # finite (not -inf): fully masked rows stay NaN-free


def attention_weights_mask(query_offset: jax.Array, num_queries: int, key_mask: jax.Array
                           ) -> jax.Array:
    """Boolean [B, 1, 1, T, S]: query slot (offset + t) may attend key slot s."""
    num_keys = key_mask.shape[1]
    query_slots = query_offset + jnp.arange(num_queries)
    causal = jnp.arange(num_keys)[None, :] <= query_slots[:, None]          # [T, S]
    allowed = causal[None] & (key_mask[:, None, :] > 0)                   # [B, T, S]
    return allowed[:, None, None, :, :]


class Attention(nn.Module):
    """x [B, T, D] -> [B, T, D]; q heads share kv heads in groups (head h uses kv head h // G).

    Attributes:
      qkv_bias: biases on q/k/v (Qwen2, Llama attention_bias); out_bias: bias on the output (Llama
      attention_bias only).
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_mask: jax.Array,
                 query_offset: jax.Array | int = 0, layer_cache: dict | None = None
                 ) -> tuple[jax.Array, dict | None]:
        """
        Args:
          x: [B, T, D]; cos, sin: [B, T, Dh] rotary tables for these tokens.
          key_mask: [B, S] with S = T without cache or the cache length with one.
          query_offset: cache slot of x's first token (the write position).
          layer_cache: {"k", "v": [B, K, S, Dh]} or None.
        Returns: (output [B, T, D], updated layer_cache or None).
        """
        batch, length, _ = x.shape
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = DenseGeneral((self.num_heads, self.head_dim), ("embed", "q_heads", "head_dim"),
                             use_bias=self.qkv_bias, name="query", **dense)(x)
        key = DenseGeneral((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"),
                           use_bias=self.qkv_bias, name="key", **dense)(x)
        value = DenseGeneral((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"),
                             use_bias=self.qkv_bias, name="value", **dense)(x)
        query = nn.with_logical_constraint(
            query, ("activation_batch", "activation_length", "activation_heads", None))
        key = nn.with_logical_constraint(
            key, ("activation_batch", "activation_length", "activation_kv_heads", None))
        value = nn.with_logical_constraint(
            value, ("activation_batch", "activation_length", "activation_kv_heads", None))
        query = apply_rope(query, cos, sin)
        key = apply_rope(key, cos, sin)

        key = key.transpose(0, 2, 1, 3)        # [B, K, T, Dh]
        value = value.transpose(0, 2, 1, 3)
        new_cache = None
        if layer_cache is not None:
            start = (0, 0, query_offset, 0)
            key = lax.dynamic_update_slice(layer_cache["k"], key.astype(layer_cache["k"].dtype), start)
            value = lax.dynamic_update_slice(layer_cache["v"], value.astype(layer_cache["v"].dtype),
                                             start)
            new_cache = {"k": key, "v": value}

        groups = self.num_heads // self.num_kv_heads
        # Both contractions keep (b, k) leading on every operand and output: XLA:CPU has no bf16
        # kernel for other orders (e.g. "bkgts,bksd->btkgd" fails in DotThunk).
        grouped_query = query.reshape(batch, length, self.num_kv_heads, groups,
                                      self.head_dim).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, Dh]
        # scores [B, K, G, T, S] accumulated in f32; softmax in f32.
        scores = einsum("bkgtd,bksd->bkgts", grouped_query, key, self.dtype, jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        allowed = attention_weights_mask(query_offset, length, key_mask)
        scores = jnp.where(allowed, scores, MASKED_SCORE)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        context = einsum("bkgts,bksd->bkgtd", probs, value, self.dtype)
        context = context.transpose(0, 3, 1, 2, 4).reshape(batch, length, self.num_heads,
                                                           self.head_dim)
        context = nn.with_logical_constraint(
            context, ("activation_batch", "activation_length", "activation_heads", None))
        out = DenseGeneral(x.shape[-1], ("q_heads", "head_dim", "embed"), axis=(-2, -1),
                           use_bias=self.out_bias, name="out", **dense)(context)
        return out, new_cache

