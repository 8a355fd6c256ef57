"""A small ECG-text CLIP for generation metrics (CLIP score, FID), after DiffuSETS's evaluation CLIP.

DiffuSETS scores generated ECGs with a bespoke CLIP: a 1-D CNN over the 12 x 1024 signal, mean-pooled,
an `ecg_projector` Linear and a `text_projector` Linear (frozen report embeddings in) to a 64-d space,
a learned logit scale initialised to log(1/0.07), symmetric InfoNCE. This one keeps that shape at a
CPU-friendly size (residual strided convs + GroupNorm + swish instead of their 7-stage SE-ResNet):

    clip = ECGClip(ECGClipConfig(text_embed_dim=384))
    ecg_features = embed_ecgs(clip, variables, ecgs)       # [N, 64] (unnormalised: FID input)
    text_features = embed_texts(clip, variables, texts)    # [N, 64]

Trained, saved and loaded by `eval.clip_training` (`train_clip`, `save_clip`, `load_clip`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.layers.conv import Conv1d
from uniecg_jax.layers.linear import Linear
from uniecg_jax.layers.norms import GroupNorm
from uniecg_jax.models.schema import ConfigSchema, dtype_field


@dataclasses.dataclass(frozen=True)
class ECGClipConfig(ConfigSchema):
    """Shape of the ECG-text CLIP (the schema of a CLIP checkpoint's `clip` group)."""
    config_group = "clip"
    text_embed_dim: int = 384
    num_leads: int = 12
    widths: tuple[int, ...] = (32, 64, 128, 128)
    kernel_size: int = 7
    num_groups: int = 8
    embed_dim: int = 64          # DiffuSETS: CLIP(embed_dim=64)
    dtype: Any = dtype_field(jnp.float32)
    param_dtype: Any = dtype_field(jnp.float32)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


class ResidualStage(nn.Module):
    """Stride-2 conv -> GN -> swish -> conv -> GN -> swish, plus a strided 1x1 skip. `[B, L, C]` ->
    `[B, L/2, features]`."""
    cfg: ECGClipConfig
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        pad = ((cfg.kernel_size - 1) // 2, cfg.kernel_size // 2)
        h = Conv1d(self.features, cfg.kernel_size, stride=2, padding=pad, name="conv1", **kw)(x)
        h = swish(GroupNorm(cfg.num_groups, name="norm1", **kw)(h))
        h = Conv1d(self.features, cfg.kernel_size, name="conv2", **kw)(h)
        h = swish(GroupNorm(cfg.num_groups, name="norm2", **kw)(h))
        skip = Conv1d(self.features, 1, stride=2, padding=(0, 0), name="skip", **kw)(x)
        return nn.with_logical_constraint(
            h + skip, ("activation_batch", "activation_length", "activation_embed"))


class ECGClip(nn.Module):
    """`encode_ecg` `[B, L, 12]` -> `[B, E]`; `encode_text` `[B, D]` -> `[B, E]` (both
    unnormalised projector outputs); `__call__` returns (ecg, text) features and the logit scale."""
    cfg: ECGClipConfig

    def setup(self):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.stages = [ResidualStage(cfg, w, name=f"stage_{i}") for i, w in enumerate(cfg.widths)]
        self.ecg_projector = Linear(features=cfg.embed_dim, name="ecg_projector", **kw)
        self.text_projector = Linear(features=cfg.embed_dim, name="text_projector", **kw)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(np.log(1 / 0.07)), ()), (), jnp.float32)

    def encode_ecg(self, ecg: jax.Array) -> jax.Array:
        x = ecg.astype(self.cfg.dtype)
        for stage in self.stages:
            x = stage(x)
        return self.ecg_projector(jnp.mean(x, axis=1)).astype(jnp.float32)

    def encode_text(self, text_embedding: jax.Array) -> jax.Array:
        return self.text_projector(text_embedding.astype(self.cfg.dtype)).astype(jnp.float32)

    def __call__(self, ecg: jax.Array, text_embedding: jax.Array):
        return self.encode_ecg(ecg), self.encode_text(text_embedding), self.logit_scale


def normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_loss(ecg_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array,
              text_embedding: jax.Array) -> jax.Array:
    """Symmetric InfoNCE. Rows with the same report (cosine of the frozen embeddings > 0.999) are
    all positives (soft targets), since synthetic and bundled reports repeat within a batch."""
    logits = jnp.exp(logit_scale) * normalize(ecg_features) @ normalize(text_features).T
    same = (normalize(text_embedding) @ normalize(text_embedding).T > 0.999).astype(jnp.float32)
    targets = same / jnp.sum(same, axis=-1, keepdims=True)
    per_ecg = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    per_text = -jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=-1), axis=-1)
    return 0.5 * (jnp.mean(per_ecg) + jnp.mean(per_text))


def leads_last(ecgs: np.ndarray) -> np.ndarray:
    """ECGs `[N, 12, L]` or `[N, L, 12]` -> float32 `[N, L, 12]` (the model's layout)."""
    ecgs = np.asarray(ecgs, np.float32)
    if ecgs.ndim != 3 or 12 not in (ecgs.shape[1], ecgs.shape[2]):
        raise ValueError(f"ECGs must be [N, 12, L] or [N, L, 12], got {ecgs.shape}")
    return ecgs if ecgs.shape[-1] == 12 else np.swapaxes(ecgs, 1, 2)


def embed_ecgs(model: ECGClip, variables: Any, ecgs: np.ndarray, batch_size: int = 64
               ) -> np.ndarray:
    """`[N, 12, L]` (or `[N, L, 12]`) -> `[N, E]` ECG features (unnormalised, as FID uses them)."""
    ecgs = leads_last(ecgs)
    fn = jax.jit(lambda v, x: model.apply(v, x, method=ECGClip.encode_ecg))
    return np.concatenate([np.asarray(fn(variables, jnp.asarray(ecgs[i:i + batch_size])))
                           for i in range(0, len(ecgs), batch_size)] or [np.zeros((0, 0))])


def embed_texts(model: ECGClip, variables: Any, text_embeddings: np.ndarray) -> np.ndarray:
    """`[N, D]` frozen text embeddings -> `[N, E]` text features."""
    return np.asarray(jax.jit(lambda v, t: model.apply(v, t, method=ECGClip.encode_text))(
        variables, jnp.asarray(text_embeddings, jnp.float32)))
