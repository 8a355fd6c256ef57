"""1-D convolutions, channels-last (`[B, L, C]`), with logical axis names on their kernels.

Kernels are `[width, C_in, C_out]` named (`conv_window`, `conv_in`, `conv_out`) and biases `[C_out]`
named `conv_out`, which the rules table in `uniecg_jax/sharding.py` maps onto the mesh (the
MaxDiffusion convention). Inputs run in the compute `dtype`; bf16 accumulates in float32 (on CPU a
bf16 x bf16 conv is ~6x slower without `preferred_element_type=float32`). Padding, stride and the
transposed convolution follow PyTorch's `nn.Conv1d` / `nn.ConvTranspose1d`, so imported weights give
the same outputs.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DType = Any


def _accumulation_dtype(dtype: DType) -> DType | None:
    # bf16 inputs accumulate in f32 (fast on CPU and exact enough); f32 stays f32.
    return jnp.float32 if jnp.dtype(dtype) != jnp.float32 else None


def _conv_params(module: nn.Module, kernel_size: int, in_channels: int, out_channels: int):
    """Kernel `[width, C_in, C_out]` and bias `[C_out]` with the conv logical axis names."""
    kernel = module.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_window", "conv_in", "conv_out")),
        (kernel_size, in_channels, out_channels), module.param_dtype)
    bias = module.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("conv_out",)), (out_channels,), module.param_dtype)
    return kernel, bias


def _conv(x, kernel, stride, padding, lhs_dilation, dtype):
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride,), padding=(tuple(padding),),
        lhs_dilation=(lhs_dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
        preferred_element_type=_accumulation_dtype(dtype))
    return y.astype(dtype)


class Conv1d(nn.Module):
    """1-D convolution `[B, L, C_in] -> [B, L', features]`; kernel `[width, C_in, C_out]`.

    `padding` is `(left, right)` zeros; `None` means "same" for odd widths at stride 1 (torch
    `padding="same"` / `padding=(k-1)//2`).
    """
    features: int
    kernel_size: int
    stride: int = 1
    padding: tuple[int, int] | None = None
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
        padding = self.padding
        if padding is None:
            padding = ((self.kernel_size - 1) // 2, self.kernel_size // 2)
        return _conv(x, kernel, self.stride, padding, 1, self.dtype) + bias.astype(self.dtype)


class ConvTranspose1d(nn.Module):
    """Transposed 1-D convolution (torch.nn.ConvTranspose1d semantics, output `(L-1)*s - 2p + k`).

    The kernel is stored `[width, C_in, C_out]` = torch's `[C_in, C_out, width]` transposed; it is
    applied as a stride-dilated input convolved with the spatially flipped kernel.
    """
    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
        edge = self.kernel_size - 1 - self.padding
        y = _conv(x, kernel[::-1], 1, (edge, edge), self.stride, self.dtype)
        return y + bias.astype(self.dtype)
