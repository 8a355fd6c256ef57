"""CLIP vision tower (OpenAI ViT, as LLaVA / GEM read images), in pure-functional Flax linen.

Architecture (transformers' `CLIPVisionModel`, which LLaVA's `CLIPVisionTower` wraps):

  pixels [B, H, W, 3] (CLIP-normalised, channels last)
    -> embeddings: patch conv (kernel = stride = patch, no bias) as one contraction per patch,
       prepend class_embedding, add position_embedding                 [B, 1 + P, hidden]
    -> pre_layrnorm (sic, HF's name)
    -> layers_{i}: x + attn(ln1(x)); x + fc2(quick_gelu(fc1(ln2(x))))
  hidden state k = the input of layer k (k = 0: after pre_layrnorm; k = L: the last layer's output;
  post_layernorm is CLIP's pooled head, never read by LLaVA). LLaVA's `feature_select` takes
  hidden state `mm_vision_select_layer` (-2: the input of the last layer) and drops the class
  token (`patch`) or keeps it (`cls_patch`): [B, P, hidden] or [B, 1 + P, hidden].

Only the layers up to the selected one run; the rest (and post_layernorm) exist in the parameter
tree so that a checkpoint imports and exports whole. GEM freezes the tower
(`requires_grad_(False)` and a `torch.no_grad` forward): `frozen=True` stops the gradient at the
features, so no backward pass runs through the tower, and `FROZEN_VISION_TOWER` is the
`train.freeze` regex for its parameters.

ViT-L/14-336 (`openai/clip-vit-large-patch14-336`, GEM's and LLaVA-1.5's tower): 336 px, patch 14
-> 576 patches, hidden 1024, 24 layers, 16 heads, MLP 4096.

    tower = ClipVisionTower(ClipVisionConfig.from_config(cfg.model.vision_tower))
    params = tower.init(rng, pixels)["params"]; features = tower.apply({"params": params}, pixels)
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from uniecg_jax.layers.activations import constrain, quick_gelu
from uniecg_jax.layers.attention import MultiHeadAttention
from uniecg_jax.layers.linear import DenseGeneral, Linear, to_dtype
from uniecg_jax.layers.norms import LayerNorm
from uniecg_jax.models.schema import ConfigSchema

Array = jax.Array

# The `train.freeze` regex that keeps the tower fixed when its params sit under `vision_tower`
# of the model's parameter tree (GEM trains the projector and the LLM, never the CLIP tower).
FROZEN_VISION_TOWER = r"^vision_tower/"
SELECT_FEATURES = ("patch", "cls_patch")
IMAGE_ASPECT_RATIOS = ("ori", "pad")


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(ConfigSchema):
    """Shape, feature selection and numerics of the CLIP vision tower (`model.vision_tower`).

    select_layer: LLaVA's `mm_vision_select_layer`, an index into the L + 1 hidden states (negative
    from the end); select_feature: `patch` (class token dropped) or `cls_patch`;
    image_aspect_ratio: how an image becomes a square (`data.image_preprocess`): `ori` = CLIP's
    resize + centre crop, `pad` = LLaVA's expand-to-square with the mean colour first;
    frozen: no gradient flows into the tower (GEM's no_grad forward).
    """
    config_group = "model.vision_tower"
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    select_layer: int = -2
    select_feature: str = "patch"
    image_aspect_ratio: str = "ori"
    frozen: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"          # compute dtype; matmuls accumulate in float32 regardless
    remat: bool = False             # rematerialise each layer in the backward pass

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_tower.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_tower.image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(f"vision_tower.select_layer={self.select_layer} is outside the "
                             f"{self.num_layers + 1} hidden states [-{self.num_layers + 1}, "
                             f"{self.num_layers}]")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"vision_tower.select_feature={self.select_feature!r}: choose from "
                             f"{SELECT_FEATURES}")
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"vision_tower.image_aspect_ratio={self.image_aspect_ratio!r}: choose "
                             f"from {IMAGE_ASPECT_RATIOS}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @property
    def layers_run(self) -> int:
        """Layers computed for the selected hidden state (23 of 24 at select_layer -2)."""
        return self.select_layer % (self.num_layers + 1)

    @property
    def num_tokens(self) -> int:
        """Feature tokens per image (576 for ViT-L/14-336 `patch`)."""
        return self.num_patches + (self.select_feature == "cls_patch")


VISION_PRESETS = {
    "vit_l14_336": dict(),
    "vit_b16_224": dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                        num_layers=12, num_heads=12),
    "tiny": dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=3,
                 num_heads=2),
}


def forward_flops(config: ClipVisionConfig) -> float:
    """Forward FLOPs per image up to the selected layer (matmuls only: patch embedding, the
    attention projections and scores, the MLP)."""
    tokens, width, mlp = config.num_positions, config.hidden_size, config.intermediate_size
    patch = 2 * config.num_patches * config.patch_size ** 2 * config.num_channels * width
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    return patch + config.layers_run * per_layer


def vision_config_dict(variant: str = "vit_l14_336") -> ml_collections.ConfigDict:
    """`model.vision_tower` config: `vit_l14_336` (openai/clip-vit-large-patch14-336, GEM's),
    `vit_b16_224`, or `tiny` (CPU tests: 56 px, 16 patches, width 32)."""
    if variant not in VISION_PRESETS:
        raise KeyError(f"unknown vision tower preset {variant!r}; choose from "
                       f"{sorted(VISION_PRESETS)}")
    return ml_collections.ConfigDict(ClipVisionConfig(**VISION_PRESETS[variant]).to_dict())


def _layer_norm(config: ClipVisionConfig, name: str) -> LayerNorm:
    return LayerNorm(epsilon=config.layer_norm_eps, dtype=to_dtype(config.dtype),
                     param_dtype=to_dtype(config.param_dtype), name=name)


class ClipEmbeddings(nn.Module):
    """pixels [B, H, W, C] -> class token + patch embeddings + positions [B, 1 + P, hidden].

    Params: class_embedding [hidden]; patch_embedding kernel [patch, patch, C, hidden] (torch's
    Conv2d weight [hidden, C, kh, kw] transposed); position_embedding [1 + P, hidden].
    """
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        batch, grid, patch = pixels.shape[0], cfg.grid_size, cfg.patch_size
        # Conv2d with kernel == stride is one matmul per non-overlapping patch: [B, g, p, g, p, C]
        # -> [B, g * g, p, p, C] (patches row-major, as torch's flatten(2)), contracted over
        # (p, p, C).
        patches = pixels.reshape(batch, grid, patch, grid, patch, cfg.num_channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, patch, patch,
                                                             cfg.num_channels)
        embeds = DenseGeneral(
            features=cfg.hidden_size, axis=(-3, -2, -1),
            # One logical name may appear once per array: the window's second axis is left
            # unnamed (conv_window is replicated anyway).
            kernel_axes=("conv_window", None, "conv_in", "conv_out"), use_bias=False,
            dtype=dtype, param_dtype=param_dtype,
            kernel_init=nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
            name="patch_embedding")(patches)
        scale = cfg.hidden_size ** -0.5
        class_embedding = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(scale), ("embed",)), (cfg.hidden_size,), param_dtype)
        position_embedding = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (cfg.num_positions, cfg.hidden_size),
            param_dtype)
        cls_tokens = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, cfg.hidden_size))
        tokens = jnp.concatenate([cls_tokens, embeds], axis=1) + position_embedding.astype(dtype)
        return constrain(tokens)


class ClipMLP(nn.Module):
    """fc1 -> quick GELU -> fc2: [B, N, hidden] -> [B, N, hidden]."""
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        cfg = self.config
        dense = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        hidden = Linear(cfg.intermediate_size, kernel_axes=("embed", "mlp"), name="fc1",
                        **dense)(tokens)
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return Linear(cfg.hidden_size, kernel_axes=("mlp", "embed"), name="fc2",
                      **dense)(quick_gelu(hidden))


class ClipEncoderLayer(nn.Module):
    """Pre-LN block: x + self_attn(layer_norm1(x)); x + mlp(layer_norm2(x)). [B, N, D] -> same."""
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        cfg = self.config
        normed = _layer_norm(cfg, "layer_norm1")(tokens)
        attention = MultiHeadAttention(cfg.num_heads, dtype=to_dtype(cfg.dtype),
                                       param_dtype=to_dtype(cfg.param_dtype), name="self_attn")
        tokens = constrain(tokens + attention(normed, normed, normed))
        tokens = tokens + ClipMLP(cfg, name="mlp")(_layer_norm(cfg, "layer_norm2")(tokens))
        return constrain(tokens)


class ClipVisionTower(nn.Module):
    """pixels [B, image_size, image_size, C] (CLIP-normalised) -> features [B, num_tokens, hidden]
    of hidden state `select_layer` (see the module docstring)."""
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"vision tower input must be [batch, {cfg.image_size}, "
                             f"{cfg.image_size}, {cfg.num_channels}] (channels last), got "
                             f"shape {tuple(pixels.shape)}")
        tokens = ClipEmbeddings(cfg, name="embeddings")(pixels.astype(to_dtype(cfg.dtype)))
        tokens = _layer_norm(cfg, "pre_layrnorm")(tokens)
        layer_cls = nn.remat(ClipEncoderLayer) if cfg.remat else ClipEncoderLayer
        layers = [layer_cls(cfg, name=f"layers_{index}") for index in range(cfg.num_layers)]
        for layer in layers[:cfg.layers_run]:
            tokens = layer(tokens)
        if self.is_initializing():
            # The layers after the selected one and CLIP's pooled-output norm are never read for
            # features, but belong to the checkpoint: create them so import/export cover it all.
            rest = tokens
            for layer in layers[cfg.layers_run:]:
                rest = layer(rest)
            _layer_norm(cfg, "post_layernorm")(rest[:, 0])
        features = tokens[:, 1:] if cfg.select_feature == "patch" else tokens
        return jax.lax.stop_gradient(features) if cfg.frozen else features


def build_vision_tower(model_cfg) -> ClipVisionTower:
    """ClipVisionTower from `cfg.model` (reads `model.vision_tower`)."""
    return ClipVisionTower(ClipVisionConfig.from_config(model_cfg.get("vision_tower", None)))
