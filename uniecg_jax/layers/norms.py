"""Normalisation layers; statistics always in float32, scale/bias named "norm" for the rules table.

- `RMSNorm` as in Llama / Qwen2 (HF `LlamaRMSNorm`): scale applied after the cast back to the
  compute dtype (matching HF's order of operations).
- `LayerNorm` (torch.nn.LayerNorm) for the ECG encoder, the alignment head, the UNet and the VAE.
- `GroupNorm` (torch.nn.GroupNorm) over channels-last `[B, L, C]`.
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


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over `[B, L, C]` (statistics per sample and group, in float32)."""
    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into "
                             f"{self.num_groups} groups")
        scale, bias = _scale_and_bias(self, channels)
        x32 = x.astype(jnp.float32)
        per_group = channels // self.num_groups
        middle = tuple(range(1, x.ndim - 1))
        count = per_group * int(np.prod([x.shape[a] for a in middle]))

        def group_mean(v):
            # Sum over positions first (a reduction over a major axis, vectorised along the
            # channels: ~2x faster on XLA:CPU than reducing the reshaped [B, L, G, C/G] over
            # axes (1, 3)), then over each group's channels; broadcast back to [B, 1.., C].
            sums = v.sum(axis=middle).reshape(v.shape[0], self.num_groups, per_group)
            means = jnp.repeat(sums.sum(-1) / count, per_group, axis=-1)
            return means.reshape(v.shape[0], *([1] * len(middle)), channels)

        centred = x32 - group_mean(x32)
        normed = centred * jax.lax.rsqrt(group_mean(jnp.square(centred)) + self.epsilon)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
