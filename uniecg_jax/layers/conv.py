"""1-D convolutions, channels-last (`[B, L, C]`), with logical axis names on their kernels.

Kernels are `[width, C_in, C_out]` named (`conv_window`, `conv_in`, `conv_out`) and biases `[C_out]`
named `conv_out`, which the rules table in `uniecg_jax/sharding.py` maps onto the mesh (the
MaxDiffusion convention). Inputs run in the compute `dtype`; bf16 accumulates in float32 (on CPU a
bf16 x bf16 conv is ~6x slower without `preferred_element_type=float32`). Padding, stride and the
transposed convolution follow PyTorch's `nn.Conv1d` / `nn.ConvTranspose1d`, so imported weights give
the same outputs.

On CPU `lax.conv` (NWC) already runs at ~85-100 GFLOP/s per Zen4 core, the f32 FMA peak, as fast
as torch's conv1d and faster than NCW, an im2col matmul or three shifted matmuls (measured at the
VAE decoder's shapes, batch 16). Winograd F(4,3) was 1.5x faster but had 8x the rounding error
(2e-5 vs 2.6e-6 per conv), F(2,3) the same error but no faster, so neither is used.
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


def _polyphase_kernels(kernel: jax.Array, factor: int) -> list[tuple[jax.Array, tuple[int, int]]]:
    """Per output phase p of `conv(repeat(x, factor), kernel, "same")`: (kernel over x, padding).

    Output sample n = factor * i + p reads upsampled samples n + j - left (tap j), i.e. input sample
    floor((p + j - left) / factor) + i; taps landing on the same input sample are summed, so the
    phase is a short convolution of x at the input rate.
    """
    width = kernel.shape[0]
    left = (width - 1) // 2
    phases = []
    for phase in range(factor):
        offsets = [(phase + j - left) // factor for j in range(width)]
        low, high = min(offsets), max(offsets)
        taps = [sum(kernel[j] for j in range(width) if offsets[j] == offset)
                for offset in range(low, high + 1)]
        phases.append((jnp.stack(taps), (-low, high)))
    return phases


class UpsampledConv1d(nn.Module):
    """Nearest-neighbour upsampling by `factor` then a stride-1 "same" `Conv1d` (torch
    `nn.Upsample(scale_factor=factor)` + `nn.Conv1d(padding=(k-1)//2)`), `[B, L, C_in] ->
    [B, factor * L, features]`, with Conv1d's parameters (kernel `[width, C_in, C_out]`, bias).

    Computed polyphase at the input rate: each output phase is a convolution of the input with the
    taps that read the same repeated sample summed (for width 3, factor 2: two 2-tap convolutions,
    2/3 of the multiply-adds of convolving the upsampled signal). Equal up to float rounding.
    """
    features: int
    kernel_size: int
    factor: int = 2
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
        phases = [_conv(x, taps, 1, padding, 1, self.dtype)
                  for taps, padding in _polyphase_kernels(kernel, self.factor)]
        batch, length, features = phases[0].shape
        y = jnp.stack(phases, axis=2).reshape(batch, self.factor * length, features)
        return y + bias.astype(self.dtype)
