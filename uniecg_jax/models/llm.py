"""Decoder-only LLM (Llama family and Qwen2) in Flax linen.

    config = LLMConfig.from_config(load_config("configs/llm.py:tiny").model)
    model = Decoder(config)
    params = model.init(rng, input_ids)["params"]            # boxed with logical axis names
    logits = model.apply({"params": params}, input_ids, attention_mask=mask)   # [B, T, V] f32

Parameter tree (no scan; with `scan_layers` the `layers_i` become one `layers` subtree whose leaves
carry a leading [L] axis, logical name "layers"):

    embedding [V, D]                          ("vocab", "embed")
    layers_i/input_norm/scale [D]             ("norm",)
    layers_i/attention/query/kernel [D, H, Dh] ("embed", "q_heads", "head_dim")   (+ bias [H, Dh])
    layers_i/attention/key|value/kernel [D, K, Dh] ("embed", "kv_heads", "head_dim") (+ bias)
    layers_i/attention/out/kernel [H, Dh, D]  ("q_heads", "head_dim", "embed")
    layers_i/post_attention_norm/scale [D]
    layers_i/mlp/gate|up/kernel [D, F]        ("embed", "mlp");  mlp/down/kernel [F, D] ("mlp", "embed")
    final_norm/scale [D]
    lm_head/kernel [D, V]                     ("embed", "vocab")   (absent when embeddings are tied)

KV cache (see `init_cache`): {"layers": per-layer {"k","v": [B, K, S, Dh]} (a tuple, or one dict of
[L, B, K, S, Dh] with scan_layers), "index": int32 scalar = slots filled, "key_mask": [B, S] int32,
"lengths": [B] int32 = real tokens so far per row (the next RoPE position)}.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.layers.attention import Attention
from uniecg_jax.layers.linear import DenseGeneral, matmul, to_dtype
from uniecg_jax.layers.mlp import SwiGLU
from uniecg_jax.layers.norms import RMSNorm
from uniecg_jax.layers.rope import RopeConfig, rope_cos_sin
from uniecg_jax.models.schema import ConfigSchema

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class RopeScaling(ConfigSchema):
    """HF `rope_scaling` (`model.rope_scaling`): kind is none | linear | dynamic | llama3. Reads
    like the HF dict (`dict(config.rope_scaling)`), which the HF converter writes back."""
    config_group = "model.rope_scaling"
    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def keys(self):
        return self.to_dict().keys()

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class LLMConfig(ConfigSchema):
    """Decoder shape and numerics: the schema of `model` (configs/llm.py) / `model.llm` (stages);
    `presets.llm` derives its ConfigDicts from it."""
    config_group = "model"
    family: str = "llama"              # llama | qwen2 (qwen2 = q/k/v biases)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0                  # 0 = hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # q/k/v biases (Qwen2)
    param_dtype: str = "float32"       # master weights
    dtype: str = "float32"             # compute dtype (bfloat16 for training at scale)
    remat: str = "none"                # one of REMAT_POLICIES
    scan_layers: bool = False          # stack layers with nn.scan (faster compiles for deep models)
    attention_query_chunk: int = 128   # cache-less causal attention in query chunks (0 = dense)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"model.family must be 'llama' or 'qwen2', got {self.family!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_query_chunk < 0:
            raise ValueError("model.attention_query_chunk must be >= 0 (0 = dense attention), got "
                             f"{self.attention_query_chunk}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of "
                             f"model.num_kv_heads={self.num_kv_heads}")
        if self.head_dim == 0 and self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; set model.head_dim")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def has_qkv_bias(self) -> bool:
        # Qwen2 always has q/k/v biases; Llama only with attention_bias (then o_proj too).
        return self.attention_bias or self.family == "qwen2"

    @property
    def compute_dtype(self) -> jnp.dtype:
        return to_dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return to_dtype(self.param_dtype)

    @property
    def rope(self) -> RopeConfig:
        scaling = self.rope_scaling
        return RopeConfig(
            head_dim=self.resolved_head_dim, theta=self.rope_theta, kind=scaling.kind,
            factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
            max_position_embeddings=self.max_position_embeddings)

    def num_params(self) -> int:
        """Parameter count (embeddings included)."""
        d, f, dh = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        attn = d * dh * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.has_qkv_bias:
            attn += dh * (self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias and self.family == "llama":
            attn += d
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)). Returns (x [B,T,D], layer_cache)."""
    config: LLMConfig

    @nn.compact
    def __call__(self, x, rope_tables, key_mask, query_offset, layer_cache):
        cfg = self.config
        dtypes = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        cos, sin = rope_tables
        normed = RMSNorm(cfg.rms_norm_eps, name="input_norm", **dtypes)(x)
        attn_out, layer_cache = Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
            qkv_bias=cfg.has_qkv_bias, out_bias=cfg.attention_bias and cfg.family == "llama",
            query_chunk=cfg.attention_query_chunk, name="attention", **dtypes,
        )(normed, cos, sin, key_mask, query_offset, layer_cache)
        x = x + attn_out
        normed = RMSNorm(cfg.rms_norm_eps, name="post_attention_norm", **dtypes)(x)
        x = x + SwiGLU(cfg.intermediate_size, name="mlp", **dtypes)(normed)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length",
                                           "activation_embed"))
        return x, layer_cache


def _layer_class(config: LLMConfig):
    if config.remat == "none":
        return DecoderLayer
    policy = {"full": None,
              "dots_saveable": jax.checkpoint_policies.dots_saveable,
              "dots_with_no_batch_dims_saveable":
                  jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[config.remat]
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not config.scan_layers)


class Decoder(nn.Module):
    """Llama / Qwen2 decoder. See the module docstring for the parameter tree and cache layout."""
    config: LLMConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), cfg.params_dtype)
        layer_cls = _layer_class(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        else:
            self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.params_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = DenseGeneral(cfg.vocab_size, ("embed", "vocab"),
                                        dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                                        out_dtype=jnp.float32)

    def embed(self, input_ids: jax.Array, extra_embeddings: jax.Array | None = None,
              extra_positions: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D] (compute dtype) with `extra_embeddings [B, N, D]` written at
        `extra_positions [B, N]` (-1 = unused slot). A fixed-size scatter, so it jits."""
        cfg = self.config
        embeds = jnp.take(self.embedding, input_ids, axis=0).astype(cfg.compute_dtype)
        if extra_embeddings is not None:
            if extra_positions is None:
                raise ValueError("extra_embeddings needs extra_positions [B, N]")
            batch, length = input_ids.shape
            if extra_embeddings.shape[:2] != extra_positions.shape:
                raise ValueError(f"extra_embeddings {extra_embeddings.shape} and extra_positions "
                                 f"{extra_positions.shape} disagree on [B, N]")
            # -1 -> an out-of-range index, which mode="drop" ignores.
            target = jnp.where(extra_positions < 0, length, extra_positions)
            rows = jnp.broadcast_to(jnp.arange(batch)[:, None], target.shape)
            embeds = embeds.at[rows, target].set(extra_embeddings.astype(embeds.dtype), mode="drop")
        return nn.with_logical_constraint(
            embeds, ("activation_batch", "activation_length", "activation_embed"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [B, T, D] -> logits [B, T, V] float32."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            logits = matmul(hidden, self.embedding, (hidden.ndim - 1,), (1,), cfg.compute_dtype,
                            jnp.float32)
        else:
            logits = self.lm_head(hidden)
        return nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None,
                 extra_embeddings: jax.Array | None = None,
                 extra_positions: jax.Array | None = None, cache: dict | None = None,
                 return_hidden: bool = False, only_last: bool = False):
        """
        Args:
          input_ids: [B, T] int32.
          positions: [B, T] RoPE positions; default: count of real tokens before each token
            (+ cache["lengths"] when decoding), which is right for left or right padding.
          attention_mask: [B, T] 1 = real token, 0 = padding (default all ones).
          extra_embeddings / extra_positions: see `embed`.
          cache: KV cache from `init_cache` (prefill or decode); the T tokens go into slots
            cache["index"] .. index + T - 1.
          return_hidden: also return the final hidden states [B, T, D] (after the final norm).
          only_last: compute logits for the last slot only ([B, 1, V]; with left padding it is
            every row's last real token) — prefill does not need the full [B, T, V].
        Returns:
          logits [B, T, V] float32, then hidden if return_hidden, then the new cache if cache given.
        """
        cfg = self.config
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        past_lengths = cache["lengths"] if cache is not None else jnp.zeros((batch,), jnp.int32)
        if positions is None:
            positions = past_lengths[:, None] + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1,
                                                            0)
        hidden = self.embed(input_ids, extra_embeddings, extra_positions)
        rope_tables = rope_cos_sin(cfg.rope, positions, cfg.compute_dtype)

        if cache is None:
            key_mask, query_offset, layer_caches = attention_mask, 0, None
        else:
            query_offset = cache["index"]
            key_mask = jax.lax.dynamic_update_slice(cache["key_mask"], attention_mask,
                                                    (0, query_offset))
            layer_caches = cache["layers"]

        if cfg.scan_layers:
            hidden, new_layer_caches = self.layers(hidden, rope_tables, key_mask, query_offset,
                                                   layer_caches)
        else:
            new_layer_caches = []
            for i, layer in enumerate(self.layers):
                hidden, layer_cache = layer(hidden, rope_tables, key_mask, query_offset,
                                            None if layer_caches is None else layer_caches[i])
                new_layer_caches.append(layer_cache)
            new_layer_caches = tuple(new_layer_caches)
        hidden = self.final_norm(hidden)
        logits = self.logits(hidden[:, -1:] if only_last else hidden)

        outputs = [logits]
        if return_hidden:
            outputs.append(hidden)
        if cache is not None:
            outputs.append({"layers": new_layer_caches, "index": query_offset + length,
                            "key_mask": key_mask,
                            "lengths": past_lengths + attention_mask.sum(axis=1)})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def init_cache(config: LLMConfig, batch_size: int, max_length: int, dtype: Any = None) -> dict:
    """Empty KV cache for `batch_size` rows and `max_length` slots (prompt + new tokens)."""
    dtype = dtype or config.compute_dtype
    # Heads before slots: the attention contractions read [B, K, S, Dh] as is (batch dims leading),
    # so a decode step does not transpose the whole cache (that cost ~25% of a batch-8 step).
    shape = (batch_size, config.num_kv_heads, max_length, config.resolved_head_dim)
    if config.scan_layers:
        stacked = (config.num_layers,) + shape
        layers = {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
    else:
        layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for _ in range(config.num_layers))
    return {"layers": layers, "index": jnp.zeros((), jnp.int32),
            "key_mask": jnp.zeros((batch_size, max_length), jnp.int32),
            "lengths": jnp.zeros((batch_size,), jnp.int32)}


def build_decoder(model_config: Any) -> tuple[Decoder, LLMConfig]:
    """`Decoder` from a `model` ConfigDict (or an LLMConfig)."""
    config = model_config if isinstance(model_config, LLMConfig) else LLMConfig.from_config(
        model_config)
    return Decoder(config), config
