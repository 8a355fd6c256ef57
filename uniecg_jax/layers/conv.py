"""1-D convolutions, channels-last (`[B, L, C]`), with logical axis names on their kernels.

Kernels are `[width, C_in, C_out]` named (`conv_window`, `conv_in`, `conv_out`) and biases `[C_out]`
named `conv_out`, which the rules table in `uniecg_jax/sharding.py` maps onto the mesh (the
MaxDiffusion convention). Inputs run in the compute `dtype`; bf16 accumulates in float32 (on CPU a
bf16 x bf16 conv is ~6x slower without `preferred_element_type=float32`). Padding, stride and the
transposed convolution follow PyTorch's `nn.Conv1d` / `nn.ConvTranspose1d`, so imported weights give
the same outputs.

On CPU `lax.conv` (NWC) already runs at ~85-100 GFLOP/s per Zen4 core, the f32 FMA peak, as fast
as torch's conv1d and faster than NCW, an im2col matmul or three shifted matmuls (measured at the
VAE decoder's shapes, batch 16). Only fewer multiplies go faster: `algorithm="winograd"` runs
stride-1 convs of width 2 and 3 by Winograd F(6, r) (`winograd_transforms`, `_winograd_conv`):
8/6 multiplies per output instead of 3 for width 3, 7/6 instead of 2 for width 2, in one batched
matmul at the same FMA rate. Measured (AMD EPYC, 2 shared cores, f32, batch 16, one conv): width 3
at 512 channels, L 256: 1.8-1.9x faster than direct (F(4, 3): 1.6-1.7x; F(2, 3): 0.9x), 256 / 512:
1.5x, 128 / 1024: 1.6x; width 2 (the upsampling phases): F(6, 2) 1.3x (F(8, 2) 1.5x but 6x the
error). Rounding: max |error| / max |output| against float64 ~5e-6 per conv at 512 channels
(F(4, 3) ~4e-6, direct 3e-7), ~2e-5 through the whole DiffuSETS decoder. "direct" stays the
default: it rounds as PyTorch does, so imported weights reproduce DiffuSETS to float precision.
`native=True` runs Winograd through the fused CPU kernel (`kernels/winograd_conv.py`: transforms and
matmuls in one pass, filters from the "prepared" collection when `models.vae.prepare_decoder` has
stored them); the VAE decides it by measurement (`models.vae.native_decoder`). `Conv1d`'s
`input_affine` / `residual` / `with_moments` (a norm + SiLU before, a residual and the output's
`channel_moments` after) mean the same either way; the kernel does them as it reads and writes.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.layers.norms import channel_moments

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


def winograd_points(count: int) -> list[float]:
    """The first `count` finite interpolation points 0, 1, -1, 2, -2, 1/2, -1/2, 3, -3, 1/3, ...:
    small magnitudes keep the transforms' entries (and so the f32 rounding error) small."""
    points = [0.0]
    for k in range(1, count):
        points += [k, -k] + ([1 / k, -1 / k] if k > 1 else [])
    return [float(p) for p in points[:count]]


@functools.lru_cache(maxsize=None)   # one build per (m, r), not one per conv traced
def winograd_transforms(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Winograd/Toom-Cook F(m, r) for 1-D correlation (Lavin & Gray 2016, "Fast Algorithms for
    Convolutional Neural Networks"), float64: `(A^T [m, n], G [n, r], B^T [n, n])`, n = m + r - 1, with

        y = A^T ((G g) * (B^T d)),   y_i = sum_k d_{i+k} g_k,

    for a tile `d [n]` and a filter `g [r]` (`*` elementwise): n multiplies for m outputs instead of
    m r. Built from n - 1 finite points a_j and infinity: the linear convolution of g with an
    m-tap h is the degree n - 1 polynomial product, evaluated at the points (G: g(a_j), the leading
    coefficient at infinity), multiplied and interpolated (Lagrange); correlation is its transpose.
    Row j of B^T holds the coefficients of prod_{l != j}(x - a_l) (of prod_l (x - a_l) at
    infinity) and the Lagrange denominators move into G, so B^T has integer entries at integer
    points.
    """
    n = m + r - 1
    points = np.array(winograd_points(n - 1))

    def evaluation(taps: int) -> np.ndarray:   # [n, taps]: a polynomial's values, then its top
        out = np.zeros((n, taps))
        out[:-1] = points[:, None] ** np.arange(taps)
        out[-1, -1] = 1.0
        return out

    denominators = np.array([np.prod([a - b for b in points if b != a]) for a in points] + [1.0])
    transform_g = evaluation(r) / denominators[:, None]
    transform_bt = np.zeros((n, n))
    for j in range(n):
        roots = [b for i, b in enumerate(points) if i != j]   # j = n - 1: all points
        transform_bt[j, :len(roots) + 1] = np.polynomial.polynomial.polyfromroots(roots)
    transforms = (evaluation(m).T, transform_g, transform_bt)
    for matrix in transforms:       # shared through the cache: read-only
        matrix.setflags(write=False)
    return transforms


# Output tile m per filter width, measured at the VAE decoder's shapes (module docstring): F(6, 3)
# is ~10% faster than F(4, 3) for ~1.3x its rounding error; F(8, 2) would need the points +-3.
WINOGRAD_TILE = {2: 6, 3: 6}
CONV_ALGORITHMS = ("direct", "winograd")


def _combine(matrix: np.ndarray, parts: list[jax.Array]) -> list[jax.Array]:
    """`[sum_k matrix[j, k] parts[k] for j]`, unrolled over the nonzero constants: XLA fuses it
    into one elementwise pass, where an einsum is a K = n matmul (the conv was 1.15x slower)."""
    rows = []
    for row in matrix:
        terms = [part if c == 1 else -part if c == -1 else part * np.float32(c)
                 for c, part in zip(row, parts) if c != 0]
        rows.append(sum(terms[1:], terms[0]))
    return rows


def _winograd_conv(x, kernel, bias, padding, dtype, tile: int | None = None):
    """Stride-1 conv `[B, L, C_in] x [r, C_in, C_out] + bias [C_out] -> [B, L', C_out]` by Winograd
    F(m, r) (m = `tile`, default `WINOGRAD_TILE[r]`).

    Cuts the padded input into overlapping tiles of n = m + r - 1 samples, transforms tiles and
    kernel (f32), runs the n independent `[B * tiles, C_in] x [C_in, C_out]` products as one
    batched matmul, point-major (the cost: n / m instead of r multiplies per output; tile-major
    was 1.5x slower, XLA transposes it) and transforms back.
    """
    width = kernel.shape[0]
    m = tile or WINOGRAD_TILE[width]
    n = m + width - 1
    transform_at, transform_g, transform_bt = winograd_transforms(m, width)
    batch, length, channels = x.shape
    out_length = length + padding[0] + padding[1] - width + 1
    tiles = -(-out_length // m)
    # Pad to tiles + 1 whole blocks of m: tile t is block t and the first r - 1 samples of block
    # t + 1 (r - 1 <= m), so a tile's samples are slices, not a gather.
    x = jnp.pad(x.astype(jnp.float32),
                ((0, 0), (padding[0], (tiles + 1) * m - length - padding[0]), (0, 0)))
    blocks = x.reshape(batch, tiles + 1, m, channels)
    samples = [blocks[:, :-1, k] if k < m else blocks[:, 1:, k - m] for k in range(n)]
    spectra = jnp.stack(_combine(transform_bt, samples)).reshape(n, batch * tiles, channels)
    filters = jnp.stack(_combine(transform_g, list(kernel.astype(jnp.float32))))
    products = jax.lax.dot_general(spectra.astype(dtype), filters.astype(dtype),
                                   (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    bias = bias.astype(jnp.float32)   # added in the output transform's pass
    y = jnp.stack([row + bias for row in _combine(transform_at, list(products))], axis=1)
    return y.reshape(batch, tiles * m, -1)[:, :out_length].astype(dtype)


def _prepared_filters(module: nn.Module, kernels: list[jax.Array], m: int) -> jax.Array:
    """The fused kernel's packed filters (`kernels.winograd_conv.pack`): read from the "prepared"
    variable collection where `models.vae.prepare_decoder` stored them (once per weights), else
    packed here, and stored when that collection is mutable (never by `init`)."""
    from uniecg_jax.kernels import winograd_conv   # imports this module
    if module.has_variable("prepared", "winograd_filters"):
        return module.get_variable("prepared", "winograd_filters")
    filters = winograd_conv.pack(kernels, m)
    if module.is_mutable_collection("prepared") and not module.is_initializing():
        module.put_variable("prepared", "winograd_filters", filters)
    return filters


def _native_winograd(module: nn.Module, x, kernels: list[jax.Array], pads: list[int], bias,
                     out_length: int, input_affine=None, residual=None
                     ) -> tuple[jax.Array, jax.Array] | None:
    """(y, y's `channel_moments`): the phases' stride-1 convs (of silu(x * scale + shift) for
    `input_affine`, plus `residual`) by the fused CPU kernel (`kernels.winograd_conv`),
    interleaved; None where it does not apply (not `module.native`, not Winograd, not f32, or the
    phases' filter widths differ or have no tile)."""
    widths = {kernel.shape[0] for kernel in kernels}
    if not (module.native and module.algorithm == "winograd" and len(widths) == 1
            and widths <= set(WINOGRAD_TILE) and jnp.dtype(module.dtype) == jnp.float32):
        return None
    from uniecg_jax.kernels import winograd_conv
    width = widths.pop()
    m = WINOGRAD_TILE[width]
    filters = _prepared_filters(module, kernels, m)
    return winograd_conv.conv(x, filters, bias, pads, width, m, out_length, kernels[0].shape[2],
                              input_affine, residual)


def activate(x: jax.Array, input_affine: tuple[jax.Array, jax.Array]) -> jax.Array:
    """silu(x * scale + shift) in f32, cast back: `input_affine` = (scale, shift) `[B, C]` per
    sample and channel (a norm folded by `GroupNorm(as_affine=True)`)."""
    scale, shift = input_affine
    return nn.silu(x.astype(jnp.float32) * scale[:, None] + shift[:, None]).astype(x.dtype)


def _epilogue(y: jax.Array, residual: jax.Array | None, with_moments: bool):
    """y (+ residual), and its `channel_moments` when asked: the XLA side of what the fused kernel
    does as it writes its output."""
    if residual is not None:
        y = y + residual.astype(y.dtype)
    return (y, channel_moments(y)) if with_moments else y


def _stride1_conv(x, kernel, bias, padding, dtype, algorithm: str):
    """A stride-1 conv plus bias `[B, L, C_in] -> [B, L', C_out]` by `algorithm` ("direct" |
    "winograd"; Winograd for the widths with a measured tile, `WINOGRAD_TILE`: not 1x1 convs)."""
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"conv algorithm {algorithm!r}; choose from {', '.join(CONV_ALGORITHMS)}")
    if algorithm == "winograd" and kernel.shape[0] in WINOGRAD_TILE:
        return _winograd_conv(x, kernel, bias, padding, dtype)
    return _conv(x, kernel, 1, padding, 1, dtype) + bias.astype(dtype)


class Conv1d(nn.Module):
    """1-D convolution `[B, L, C_in] -> [B, L', features]`; kernel `[width, C_in, C_out]`.

    `padding` is `(left, right)` zeros; `None` means "same" for odd widths at stride 1 (torch
    `padding="same"` / `padding=(k-1)//2`). `algorithm` ("direct" | "winograd") applies at stride 1;
    `native` runs Winograd through the fused CPU kernel (`kernels.winograd_conv`; the caller checks
    that it loads and wins here). `input_affine=(scale, shift)` (`[B, C_in]` each) convolves
    silu(x * scale + shift) instead of x (zero-padded after the activation, as torch pads its
    input); `residual` (shaped like the output) is added; `with_moments=True` returns
    `(y, channel_moments(y))`. The fused kernel does all three as it reads x and writes y, so none
    makes a pass over memory of its own (a residual block's norm -> SiLU -> conv, + input).
    """
    features: int
    kernel_size: int
    stride: int = 1
    padding: tuple[int, int] | None = None
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    algorithm: str = "direct"
    native: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, input_affine: tuple[jax.Array, jax.Array] | None = None,
                 residual: jax.Array | None = None, with_moments: bool = False):
        kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
        padding = self.padding
        if padding is None:
            padding = ((self.kernel_size - 1) // 2, self.kernel_size // 2)
        if self.stride == 1:
            out_length = x.shape[1] + padding[0] + padding[1] - self.kernel_size + 1
            fused = _native_winograd(self, x, [kernel], [padding[0]], bias, out_length,
                                     input_affine, residual)
            if fused is not None:
                return fused if with_moments else fused[0]
        if input_affine is not None:
            x = activate(x, input_affine)
        if self.stride == 1:
            y = _stride1_conv(x, kernel, bias, padding, self.dtype, self.algorithm)
        else:
            y = _conv(x, kernel, self.stride, padding, 1, self.dtype) + bias.astype(self.dtype)
        return _epilogue(y, residual, with_moments)


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
    `algorithm` ("direct" | "winograd") computes the phases; `native` runs Winograd through the fused
    CPU kernel, all phases in one call that writes them interleaved. `with_moments=True` returns
    `(y, channel_moments(y))` (as `Conv1d`).
    """
    features: int
    kernel_size: int
    factor: int = 2
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    algorithm: str = "direct"
    native: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, with_moments: bool = False):
        kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
        polyphase = _polyphase_kernels(kernel, self.factor)
        fused = _native_winograd(self, x, [taps for taps, _ in polyphase],
                                 [padding[0] for _, padding in polyphase], bias, x.shape[1])
        if fused is not None:
            return fused if with_moments else fused[0]
        phases = [_stride1_conv(x, taps, bias, padding, self.dtype, self.algorithm)
                  for taps, padding in polyphase]
        batch, length, features = phases[0].shape
        y = jnp.stack(phases, axis=2).reshape(batch, self.factor * length, features)
        return _epilogue(y, None, with_moments)
