"""Normalisation layers; statistics always in float32, scale/bias named "norm" for the rules table.

- `RMSNorm` as in Llama / Qwen2 (HF `LlamaRMSNorm`): scale applied after the cast back to the
  compute dtype (matching HF's order of operations).
- `LayerNorm` (torch.nn.LayerNorm) for the ECG encoder, the alignment head, the UNet and the VAE.
- `GroupNorm` (torch.nn.GroupNorm) over channels-last `[B, L, C]`; `channel_moments`, the
  statistics a producer can hand it.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class RMSNorm(nn.Module):
    """x [..., D] -> x / rms(x) * scale, scale [D] (logical axis "norm")."""
    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)
        return normed * scale.astype(self.dtype)


def _scale_and_bias(module: nn.Module, features: int) -> tuple[jax.Array, jax.Array]:
    """`scale` (ones) and `bias` (zeros), each `[features]` with logical axis "norm"."""
    scale = module.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                               ("norm",)), (features,),
                         module.param_dtype)
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ("norm",)), (features,),
                        module.param_dtype)
    return scale, bias


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis: x [..., D] -> [..., D] in `dtype`.

    Float32 statistics with a two-pass variance (mean of squared deviations), then
    `((x - mean) * rsqrt(var + eps)) * scale + bias`: normalise first, then the affine map, in
    torch's order (torch.nn.LayerNorm: `(x - E[x]) / sqrt(Var[x] + eps) * gamma + beta`). This is
    the one LayerNorm of the project: the UNet/VAE and the alignment head always computed it this
    way; the ECG encoder used flax's `nn.LayerNorm`, which folds the scale into the rsqrt first
    (`(x - mean) * (rsqrt * scale)`), a last-bit difference from torch that is gone now.
    """
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = _scale_and_bias(self, x.shape[-1])
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def channel_moments(x: jax.Array) -> jax.Array:
    """`[B, L.., C]` -> `[B, 2, C]` f32: per sample and channel, the mean over positions and the
    squared deviations from it, summed (what `GroupNorm(moments=...)` combines into its groups)."""
    x32 = x.astype(jnp.float32)
    middle = tuple(range(1, x.ndim - 1))
    mean = x32.mean(axis=middle, keepdims=True)
    deviations = jnp.square(x32 - mean).sum(axis=middle)
    return jnp.stack([mean.reshape(deviations.shape), deviations], axis=1)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over `[B, L, C]` (statistics per sample and group, in float32).

    `moments` (`[B, 2, C]`, `channel_moments` of x) gives the statistics where a producer already
    summed them (the fused Winograd conv kernel does as it writes x), so x is not read for them;
    the groups' variances combine the channels' exactly (Chan et al.), with no cancellation.
    `as_affine=True` returns the norm folded into per-sample channel maps instead, `(scale, shift)`
    each `[B, C]` f32 with norm(x) = x * scale + shift (to rounding), for a consumer that applies it
    while it reads x (`layers.conv.Conv1d(input_affine=...)`).
    """
    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, as_affine: bool = False, moments: jax.Array | None = None):
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into "
                             f"{self.num_groups} groups")
        scale, bias = _scale_and_bias(self, channels)
        scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        batch, per_group = x.shape[0], channels // self.num_groups
        middle = tuple(range(1, x.ndim - 1))
        positions = int(np.prod([x.shape[a] for a in middle]))
        keep = (batch, *([1] * len(middle)), channels)   # [B, 1.., C]

        def per_channel(groups):   # [B, G] -> [B, 1.., C]
            return jnp.repeat(groups, per_group, axis=-1).reshape(keep)

        def group_mean(v):
            # Sum over positions first (a reduction over a major axis, vectorised along the
            # channels: ~2x faster on XLA:CPU than reducing the reshaped [B, L, G, C/G] over
            # axes (1, 3)), then over each group's channels; broadcast back to [B, 1.., C].
            sums = v.sum(axis=middle).reshape(batch, self.num_groups, per_group)
            return per_channel(sums.sum(-1) / (per_group * positions))

        if moments is None:
            mean = group_mean(x32)
            variance = group_mean(jnp.square(x32 - mean))
        else:
            means, deviations = (part.reshape(batch, self.num_groups, per_group)
                                 for part in (moments[:, 0], moments[:, 1]))
            group_means = means.mean(-1, keepdims=True)
            squares = deviations.sum(-1) + positions * jnp.square(means - group_means).sum(-1)
            mean = per_channel(group_means[..., 0])
            variance = per_channel(squares / (per_group * positions))
        inverse_std = jax.lax.rsqrt(variance + self.epsilon)
        if as_affine:
            folded = (inverse_std * scale).reshape(batch, channels)
            return folded, bias - mean.reshape(batch, channels) * folded
        return ((x32 - mean) * inverse_std * scale + bias).astype(self.dtype)
