"""ECG patch encoder (ECG-CoCa compatible) and GEM's two projectors, in pure-functional Flax linen.

Architecture (what GEM / ECG-Chat's ECG-CoCa tower computes, with `output_last_transformer_layer`):

  ecg [B, leads, samples]
    -> conv1: Conv1d(leads -> width, kernel = stride = patch_size, no bias)    [B, P, width]
    -> prepend class_embedding, add positional_embedding                      [B, 1 + P, width]
    -> ln_pre -> `layers` pre-LN blocks (LN -> MHA -> +, LN -> GELU MLP -> +)   [B, 1 + P, width]
  All 1 + P tokens are returned; GEM skips ln_post / proj / pooling for the LLM input.

  ECGProjector: `ecg_projector` Linear(width -> ecg_proj_dim), then `mm_projector` mlp2x_gelu
  (Linear -> GELU -> Linear) into the LLM width.

Full size: width 768, 12 layers, 12 heads, patch 50, 5000 samples (10 s at 500 Hz) -> 101 tokens.

Config (`model.ecg_encoder.*`, `model.projector.*` of a ConfigDict; the schema, every field and its
default, is `ECGEncoderConfig` / `ProjectorConfig`; `encoder_config_dict` derives the presets):

  tower = ECGTower(ECGEncoderConfig.from_config(cfg.model.ecg_encoder),
                   ProjectorConfig.from_config(cfg.model.projector))
  params = tower.init(rng, ecg)["params"]; llm_tokens = tower.apply({"params": params}, ecg)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from uniecg_jax.layers.attention import bidirectional_attention
from uniecg_jax.layers.linear import DenseGeneral, Linear, to_dtype
from uniecg_jax.layers.norms import LayerNorm
from uniecg_jax.models.schema import ConfigSchema

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ECGEncoderConfig(ConfigSchema):
    """Shape and numerics of the ECG-CoCa tower (`model.ecg_encoder`); `heads` divides `width`."""
    config_group = "model.ecg_encoder"
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 50
    num_samples: int = 5000
    num_leads: int = 12
    layer_norm_eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "float32"          # compute dtype; matmuls accumulate in float32 regardless
    remat: bool = False             # rematerialise each block in the backward pass

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"ecg_encoder.width={self.width} is not divisible by heads={self.heads}")
        if self.num_samples % self.patch_size:
            raise ValueError(f"ecg_encoder.num_samples={self.num_samples} is not a multiple of "
                             f"patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return self.num_samples // self.patch_size

    @property
    def num_tokens(self) -> int:
        """CLS token + one token per patch (101 at full size)."""
        return 1 + self.num_patches

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(ConfigSchema):
    """GEM's `ecg_projector` (linear, ecg width -> ecg_proj_dim) and `mm_projector` (mlp{depth}x_gelu,
    ecg_proj_dim -> llm_hidden_size). `ecg_width` is filled from the encoder when left at 0."""
    config_group = "model.projector"
    ecg_proj_dim: int = 1024
    llm_hidden_size: int = 4096
    mm_projector_depth: int = 2
    ecg_width: int = 0
    param_dtype: str = "float32"
    dtype: str = "float32"

    @classmethod
    def from_config(cls, cfg: Any = None, group: str | None = None, ecg_width: int | None = None,
                    **derived: Any) -> "ProjectorConfig":
        """`ConfigSchema.from_config`; `ecg_width` (the encoder's width) fills `ecg_width` 0."""
        config = super().from_config(cfg, group, **derived)
        return config.replace(ecg_width=ecg_width) if ecg_width and not config.ecg_width else config


def encoder_config_dict(variant: str = "full") -> ml_collections.ConfigDict:
    """`model.ecg_encoder` config: `full` (ECG-CoCa, 101 x 768), `small` or `tiny` (CPU tests)."""
    presets = {
        "full": dict(),
        "small": dict(width=256, layers=4, heads=4, patch_size=50),
        "tiny": dict(width=32, layers=2, heads=2, patch_size=50),
    }
    if variant not in presets:
        raise KeyError(f"unknown ECG encoder preset {variant!r}; choose from {sorted(presets)}")
    return ml_collections.ConfigDict(ECGEncoderConfig(**presets[variant]).to_dict())


def projector_config_dict(llm_hidden_size: int, ecg_proj_dim: int = 1024) -> ml_collections.ConfigDict:
    """`model.projector` config; GEM uses ecg_proj_dim 1024 (CLIP ViT-L width) and mlp2x_gelu."""
    return ml_collections.ConfigDict(ProjectorConfig(
        llm_hidden_size=llm_hidden_size, ecg_proj_dim=ecg_proj_dim).to_dict())


def _dense(features: int, axes: tuple[str, str], param_dtype: Any, dtype: Any,
           name: str) -> DenseGeneral:
    """Linear over the last axis with a bias (torch nn.Linear), kernel [in, out] named `axes`."""
    return Linear(features, kernel_axes=axes, dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(config: ECGEncoderConfig, name: str) -> LayerNorm:
    return LayerNorm(epsilon=config.layer_norm_eps, dtype=to_dtype(config.dtype),
                     param_dtype=to_dtype(config.param_dtype), name=name)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention (torch nn.MultiheadAttention semantics, no mask).

    Params: query/key/value kernels [width, heads, head_dim] + biases [heads, head_dim];
    out kernel [heads, head_dim, width] + bias [width].
    """
    config: ECGEncoderConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        """tokens [B, N, width] -> [B, N, width]."""
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        head_axes = ("activation_batch", "activation_length", "activation_heads", None)

        def project(name: str, heads_axis: str) -> Array:
            out = DenseGeneral(
                features=(cfg.heads, cfg.head_dim), kernel_axes=("embed", heads_axis, "head_dim"),
                use_bias=True, dtype=dtype, param_dtype=param_dtype,
                kernel_init=nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                name=name)(tokens)
            return nn.with_logical_constraint(out, head_axes)

        query = project("query", "q_heads")
        key = project("key", "kv_heads")
        value = project("value", "kv_heads")
        context = nn.with_logical_constraint(bidirectional_attention(query, key, value, dtype),
                                             head_axes)
        return DenseGeneral(
            features=cfg.width, axis=(-2, -1), kernel_axes=("q_heads", "head_dim", "embed"),
            use_bias=True, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
            name="out")(context)


class ResidualBlock(nn.Module):
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)); x + mlp(ln_2(x)) with exact GELU."""
    config: ECGEncoderConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        """tokens [B, N, width] -> [B, N, width]."""
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        act_axes = ("activation_batch", "activation_length", "activation_embed")
        tokens = tokens + SelfAttention(cfg, name="attn")(_layer_norm(cfg, "ln_1")(tokens))
        tokens = nn.with_logical_constraint(tokens, act_axes)
        hidden = _dense(cfg.mlp_dim, ("embed", "mlp"), param_dtype, dtype, "c_fc")(
            _layer_norm(cfg, "ln_2")(tokens))
        hidden = nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_length", "activation_mlp"))
        # torch nn.GELU() default is the exact erf form, not the tanh approximation.
        hidden = jax.nn.gelu(hidden, approximate=False)
        tokens = tokens + _dense(cfg.width, ("mlp", "embed"), param_dtype, dtype, "c_proj")(hidden)
        return nn.with_logical_constraint(tokens, act_axes)


class ECGEncoder(nn.Module):
    """ECG-CoCa tower: ecg [B, num_leads, num_samples] -> all tokens [B, 1 + num_patches, width]."""
    config: ECGEncoderConfig

    @nn.compact
    def __call__(self, ecg: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        if ecg.ndim != 3 or ecg.shape[1:] != (cfg.num_leads, cfg.num_samples):
            raise ValueError(f"ECG input must be [batch, {cfg.num_leads} leads, {cfg.num_samples} "
                             f"samples] (GEM layout), got shape {tuple(ecg.shape)}")
        batch = ecg.shape[0]
        # Conv1d with kernel == stride is a matmul over non-overlapping windows:
        # [B, C, P * K] -> [B, P, K, C], contracted over (K, C) with kernel [K, C, width]
        # (Flax Conv's [window, in, out] layout).
        windows = ecg.reshape(batch, cfg.num_leads, cfg.num_patches, cfg.patch_size)
        windows = windows.transpose(0, 2, 3, 1)
        patches = DenseGeneral(
            features=cfg.width, axis=(-2, -1), kernel_axes=("conv_window", "conv_in", "conv_out"),
            use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
            name="conv1")(windows)

        scale = cfg.width ** -0.5
        class_embedding = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(scale), ("embed",)), (cfg.width,), param_dtype)
        positional_embedding = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(scale), (None, "embed")), (cfg.num_tokens, cfg.width),
            param_dtype)
        cls_tokens = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, cfg.width))
        tokens = jnp.concatenate([cls_tokens, patches], axis=1) + positional_embedding.astype(dtype)
        tokens = nn.with_logical_constraint(
            tokens, ("activation_batch", "activation_length", "activation_embed"))
        tokens = _layer_norm(cfg, "ln_pre")(tokens)

        block_cls = nn.remat(ResidualBlock) if cfg.remat else ResidualBlock
        for index in range(cfg.layers):
            tokens = block_cls(cfg, name=f"resblocks_{index}")(tokens)
        return tokens


class ECGProjector(nn.Module):
    """GEM projectors: ecg tokens [B, N, ecg_width] -> LLM embeddings [B, N, llm_hidden_size]."""
    config: ProjectorConfig

    @nn.compact
    def __call__(self, ecg_tokens: Array, image_features: Array | None = None) -> Array:
        """image_features [B, I, ecg_proj_dim] (CLIP features, 1024 wide in GEM) join the ECG
        tokens after `ecg_projector` and share the per-token `mm_projector` (GEM's
        `encode_images`): [B, E, width] (+ [B, I, ecg_proj_dim]) -> [B, E (+ I), D]."""
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        if cfg.ecg_width and ecg_tokens.shape[-1] != cfg.ecg_width:
            raise ValueError(f"projector expects ECG tokens of width {cfg.ecg_width}, "
                             f"got shape {tuple(ecg_tokens.shape)}")
        hidden = _dense(cfg.ecg_proj_dim, ("embed", "mlp"), param_dtype, dtype,
                        "ecg_projector")(ecg_tokens)
        if image_features is not None:
            # One [B, E + I] token axis through mm_projector (it acts per token). Projecting the
            # image features in a call of their own mixed up batch shards on a (data 2, fsdp 2,
            # tensor 2) mesh under XLA's SPMD partitioner (jax 0.10.2, CPU).
            hidden = jnp.concatenate([hidden, image_features.astype(hidden.dtype)], axis=1)
        hidden = nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_length", "activation_mlp"))
        hidden = MLPGelu(cfg, name="mm_projector")(hidden)
        return nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_length", "activation_embed"))


class MLPGelu(nn.Module):
    """LLaVA's `mlp{depth}x_gelu`: Linear, then (GELU, Linear) x (depth - 1); layers `fc_{i}`."""
    config: ProjectorConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        for index in range(cfg.mm_projector_depth):
            if index:
                hidden = jax.nn.gelu(hidden, approximate=False)
            hidden = _dense(cfg.llm_hidden_size, ("mlp", "embed"), param_dtype, dtype,
                            f"fc_{index}")(hidden)
        return hidden


class ECGTower(nn.Module):
    """Encoder + projectors: ecg [B, leads, samples] -> LLM-width tokens [B, 1 + P, llm_hidden_size].

    Params: {"encoder": ..., "projector": {"ecg_projector", "mm_projector"}}; GEM freezes "encoder".
    """
    encoder_config: ECGEncoderConfig
    projector_config: ProjectorConfig

    def setup(self):
        self.encoder = ECGEncoder(self.encoder_config)
        self.projector = ECGProjector(self.projector_config)

    def __call__(self, ecg: Array) -> Array:
        return self.projector(self.encoder(ecg))

    def encode(self, ecg: Array) -> Array:
        """Encoder tokens only: [B, 1 + P, width]."""
        return self.encoder(ecg)

    def with_image(self, ecg: Array, image_features: Array) -> Array:
        """ECG [B, leads, samples] and CLIP features [B, I, ecg_proj_dim] -> [B, E + I, D]: ECG
        tokens through `ecg_projector` + `mm_projector`, then the image tokens through the shared
        `mm_projector` alone (GEM's `encode_ecgs` / `encode_images`, concatenated in that order)."""
        return self.projector(self.encoder(ecg), image_features)


def build_tower(model_cfg: Mapping[str, Any]) -> ECGTower:
    """ECGTower from `cfg.model` (reads `model.ecg_encoder` and `model.projector`)."""
    encoder_cfg = ECGEncoderConfig.from_config(model_cfg.get("ecg_encoder", None))
    projector_cfg = ProjectorConfig.from_config(model_cfg.get("projector", None),
                                                ecg_width=encoder_cfg.width)
    return ECGTower(encoder_cfg, projector_cfg)
