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
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, -1)
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
