"""Softmax attention: the bidirectional core of every encoder, and the LLM's causal grouped-query
attention.

Bidirectional (`bidirectional_attention`, one function): the ECG encoder, the alignment head, the
UNet and the VAE call it on their own projections (`[B, L, H, Dh]`), so their parameter trees stay
as they were; `MultiHeadAttention` is torch.nn.MultiheadAttention's in/out projections around it.

Causal (`Attention`): grouped-query self-attention with RoPE, causal + padding masks and an explicit
KV cache.

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

from uniecg_jax.layers.linear import DenseGeneral, Linear, einsum
from uniecg_jax.layers.rope import apply_rope

MASKED_SCORE = float(jnp.finfo(jnp.float32).min)  # finite (not -inf): fully masked rows stay NaN-free
MAX_QUERY_CHUNKS = 8


def bidirectional_attention(query: jax.Array, key: jax.Array, value: jax.Array, dtype: Any,
                            key_mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention without a causal mask: query [B, Lq, H, Dh], key/value [B, Lk, H, Dh],
    key_mask [B, Lk] (True = may be attended; None = all) -> context [B, Lq, H, Dh] in `dtype`.

    Scores and softmax in float32 (bf16 logits over ~100 tokens lose the small weights), both
    contractions accumulate in float32. Scores are scaled as `scores * Dh ** -0.5` after the
    contraction, as the causal core below and torch's `scaled_dot_product_attention` (which
    open_clip's ECG-CoCa tower runs) do; the DiffuSETS VAE divides by `sqrt(Dh)` instead
    (`vae/vae_model.py`, commit b610a00), a last-bit difference (test_layers pins this choice).
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", query.astype(dtype), key.astype(dtype),
                        preferred_element_type=jnp.float32)
    scores = scores * (query.shape[-1] ** -0.5)
    if key_mask is not None:
        scores = jnp.where(key_mask[:, None, None, :], scores, MASKED_SCORE)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(dtype),
                         preferred_element_type=jnp.float32)
    return context.astype(dtype)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, L, D] -> [B, L, num_heads, D // num_heads] (torch.nn.MultiheadAttention's head split)."""
    batch, length, width = x.shape
    if width % num_heads:
        raise ValueError(f"attention width {width} is not divisible by {num_heads} heads")
    return x.reshape(batch, length, num_heads, width // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, L, H, Dh] -> [B, L, H * Dh]."""
    return x.reshape(*x.shape[:2], -1)


class MultiHeadAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first): q/k/v in-projections, attention, out-projection.

    query [B, Lq, D], key/value [B, Lk, D] -> [B, Lq, D]. Params `q_proj`, `k_proj`, `v_proj`,
    `out_proj` (kernels [D, D]).
    """
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
        width = query.shape[-1]

        def linear(name, axes=("embed", "mlp")):
            return Linear(width, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)
        heads = [split_heads(linear(name)(x), self.num_heads)
                 for name, x in (("q_proj", query), ("k_proj", key), ("v_proj", value))]
        context = merge_heads(bidirectional_attention(*heads, self.dtype))
        return linear("out_proj", ("mlp", "embed"))(context)


def attention_weights_mask(query_offset: jax.Array, num_queries: int, key_mask: jax.Array
                           ) -> jax.Array:
    """Boolean [B, 1, 1, T, S]: query slot (offset + t) may attend key slot s."""
    num_keys = key_mask.shape[1]
    query_slots = query_offset + jnp.arange(num_queries)
    causal = jnp.arange(num_keys)[None, :] <= query_slots[:, None]          # [T, S]
    allowed = causal[None] & (key_mask[:, None, :] > 0)                   # [B, T, S]
    return allowed[:, None, None, :, :]


def grouped_attention(grouped_query: jax.Array, key: jax.Array, value: jax.Array,
                      allowed: jax.Array, dtype: Any) -> jax.Array:
    """Softmax attention: query [B, K, G, T, Dh], key/value [B, K, S, Dh], allowed [B,1,1,T,S]
    -> context [B, K, G, T, Dh]. Scores are accumulated and normalised in f32."""
    # Both contractions keep (b, k) leading on every operand and output: XLA:CPU has no bf16
    # kernel for other orders (e.g. "bkgts,bksd->btkgd" fails in DotThunk).
    scores = einsum("bkgtd,bksd->bkgts", grouped_query, key, dtype, jnp.float32)
    scores = scores * (grouped_query.shape[-1] ** -0.5)
    scores = jnp.where(allowed, scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return einsum("bkgts,bksd->bkgtd", probs, value, dtype)


def causal_attention_in_chunks(grouped_query: jax.Array, key: jax.Array, value: jax.Array,
                               key_mask: jax.Array, query_chunk: int, dtype: Any) -> jax.Array:
    """`grouped_attention` of T queries over the same T keys (no cache), in query chunks.

    Chunk [a, b) only scores keys [0, b): the causal mask hides the rest, so skipping them gives the
    same result bit for bit while saving up to half the score FLOPs and softmax passes (fwd+bwd
    ~25-35% less attention time on CPU at T=512). Chunks are `query_chunk` long, or longer so that
    there are at most MAX_QUERY_CHUNKS of them (bounds the unrolled graph for long sequences).
    """
    length = grouped_query.shape[3]
    chunk = max(query_chunk, -(-length // MAX_QUERY_CHUNKS))
    parts = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        allowed = attention_weights_mask(start, stop - start, key_mask[:, :stop])
        parts.append(grouped_attention(grouped_query[:, :, :, start:stop], key[:, :, :stop],
                                       value[:, :, :stop], allowed, dtype))
    return jnp.concatenate(parts, axis=3)


class Attention(nn.Module):
    """x [B, T, D] -> [B, T, D]; q heads share kv heads in groups (head h uses kv head h // G).

    Attributes:
      qkv_bias: biases on q/k/v (Qwen2, Llama attention_bias); out_bias: bias on the output (Llama
      attention_bias only).
      query_chunk: without a cache (training, scoring), queries are processed in chunks of this
        many that skip the keys the causal mask hides (`causal_attention_in_chunks`); 0 = one
        dense [T, T] score matrix.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    query_chunk: int = 128

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
        grouped_query = query.reshape(batch, length, self.num_kv_heads, groups,
                                      self.head_dim).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, Dh]
        if (layer_cache is None and self.query_chunk and length > self.query_chunk
                and isinstance(query_offset, int) and query_offset == 0):
            context = causal_attention_in_chunks(grouped_query, key, value, key_mask,
                                                 self.query_chunk, self.dtype)
        elif layer_cache is not None:
            context = self.attend_cache(grouped_query, key, value, key_mask, query_offset)
        else:
            allowed = attention_weights_mask(query_offset, length, key_mask)
            context = grouped_attention(grouped_query, key, value, allowed, self.dtype)
        context = context.transpose(0, 3, 1, 2, 4).reshape(batch, length, self.num_heads,
                                                           self.head_dim)
        context = nn.with_logical_constraint(
            context, ("activation_batch", "activation_length", "activation_heads", None))
        out = DenseGeneral(x.shape[-1], ("q_heads", "head_dim", "embed"), axis=(-2, -1),
                           use_bias=self.out_bias, name="out", **dense)(context)
        return out, new_cache

    def attend_cache(self, grouped_query: jax.Array, key: jax.Array, value: jax.Array,
                     key_mask: jax.Array, query_offset: jax.Array | int) -> jax.Array:
        """`grouped_attention` of queries [B, K, G, T, Dh] written from cache slot `query_offset`
        on over the cache's key/value [B, K, S, Dh] -> context [B, K, G, T, Dh].

        A method of its own so that a caller can swap the implementation from outside
        (`flax.linen.intercept_methods`) without this layer knowing: decoding on CPU injects
        `kernels.decode_attention` here (`decode_attention.injected`).
        """
        allowed = attention_weights_mask(query_offset, grouped_query.shape[3], key_mask)
        return grouped_attention(grouped_query, key, value, allowed, self.dtype)

