"""Winograd 1-D convolution on CPU with its transforms fused into the matmuls, as an XLA FFI call.

    if winograd_conv.load():                                   # compiles once per machine
        filters = winograd_conv.pack([kernel], m=6)            # [r, C_in, C_out] -> panels, once
        y, moments = winograd_conv.conv(x, filters, bias, pads=[1], width=3, m=6,
                                        out_length=L, channels_out=C)

Why: `layers.conv` runs Winograd F(6, r) in XLA as separate passes over memory (input transform,
one batched matmul, output transform), and at the DiffuSETS decoder's shapes those passes and the
per-call filter transforms were ~40% of the decode (stop 30's profile). winograd_conv.cc transforms
a block of tiles into a buffer that stays in L2, runs every point's product from it with the
accumulators in registers and folds the products into the outputs at once.

A residual block's neighbours ride along (`input_affine`, `residual`, the moments): its GroupNorm,
folded into per-sample channel scales and shifts, and SiLU are applied as x is read; the residual
is added and the output's per-channel moments are summed as y is written, so the next GroupNorm
reads no tensor for its statistics. In XLA each of those is a pass over memory of its own.

One conv with all of that, batch 16, AMD EPYC (Zen 3, AVX2, 2 shared cores), filters packed
beforehand, against XLA's Winograd with the same activation, residual and moments, one run
(stop 32): 512 channels at L 256, 19.3 vs 20.9 ms; 256 / L 512: 10.2 vs 13.7 ms; 128 / L 1024:
6.3 vs 9.0 ms. The whole DiffuSETS decode: 465-487 ms against 585-646 ms for XLA's Winograd and
1011-1020 ms for DiffuSETS's PyTorch (`python bench/diffusion.py --torch`, README).

`pack` transforms and lays out the filters once per weights: a module running the kernel keeps
them in the "prepared" variable collection (`layers.conv`, `models.vae.prepare_decoder`), so a
decode call reads them instead of recomputing them.

Where the kernel wins is measured, not assumed (it is tuned on an AVX2 Zen 3; AVX-512 builds use
12 x 32 register blocks): `usable` times the whole decode both ways once per (CPU, jax version,
kernel source, model, batch) and caches the decision beside the compiled kernel
(`native.cached_decision`). UNIECG_WINOGRAD_KERNEL=1 / =0 forces the kernel on / off.
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.kernels import native
from uniecg_jax.layers.conv import winograd_transforms

TARGET = "uniecg_winograd_conv"
_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
CALIBRATION_REPEATS = 5        # timed calls per side at most (best taken) ...
CALIBRATION_BUDGET_S = 3.0     # ... stopping after 2 once this much time has gone
# Test hook: seconds added inside every timed call of one side ("kernel" / "xla"); zero outside
# tests.
CALIBRATION_DELAY_S = {"kernel": 0.0, "xla": 0.0}


def _forced() -> bool | None:
    """UNIECG_WINOGRAD_KERNEL: "1" True (kernel wherever eligible), "0" False, else None
    (measure)."""
    return {"0": False, "1": True}.get(os.environ.get("UNIECG_WINOGRAD_KERNEL", "").strip())


def load() -> bool:
    """True once the kernel is compiled and registered as an XLA CPU FFI target; False (with one
    warning) where it cannot be, or when UNIECG_WINOGRAD_KERNEL=0."""
    if _forced() is False:
        return False
    return native.load_library(_SOURCE, {"UniecgWinogradConv": TARGET})


def panel_width() -> int:
    """Output columns per packed filter panel in this build (32 with AVX-512, 16 with AVX2)."""
    if not load():
        raise RuntimeError("winograd_conv: the kernel is not loaded")
    return int(native.library(_SOURCE).UniecgWinogradPanel())


def pack(kernels: Sequence[jax.Array], m: int) -> jax.Array:
    """Filters of P phases, each `[r, C_in, C_out]`, -> transformed by Winograd F(m, r)'s G and
    laid out as column panels `[P, n, ceil(C_out / panel), C_in, panel]` f32 (zero-padded)."""
    panel = panel_width()
    packed = []
    for kernel in kernels:
        width, channels_in, channels_out = kernel.shape
        transform_g = jnp.asarray(winograd_transforms(m, width)[1], jnp.float32)
        filters = jnp.einsum("nr,rio->nio", transform_g, kernel.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
        panels = -(-channels_out // panel)
        filters = jnp.pad(filters, ((0, 0), (0, 0), (0, panels * panel - channels_out)))
        packed.append(filters.reshape(-1, channels_in, panels, panel).transpose(0, 2, 1, 3))
    return jnp.stack(packed)


def conv(x: jax.Array, filters: jax.Array, bias: jax.Array, pads: Sequence[int], width: int,
         m: int, out_length: int, channels_out: int,
         input_affine: tuple[jax.Array, jax.Array] | None = None,
         residual: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`[B, L, C_in]` -> (y `[B, P * out_length, C_out]`, moments `[B, 2, C_out]`) f32.

    y: for each phase p the stride-1 conv of a = x (or a = silu(x * scale + shift) for
    `input_affine` = (scale, shift), each `[B, C_in]`) zero-padded by `pads[p]` on the left (and as
    needed on the right) with that phase's packed filters, plus `bias` (and `residual`, shaped like
    y); the P phases interleaved sample by sample (P = 1: a plain conv; P = 2: a nearest-upsampled
    conv computed polyphase). moments: y's per-sample channel means and summed squared deviations
    (`layers.norms.channel_moments`), summed in f64 as y is written. Requires `load()`.
    """
    phases = filters.shape[0]
    if len(pads) != phases:
        raise ValueError(f"winograd_conv: {len(pads)} pads for {phases} phases")
    transform_at, _, transform_bt = (np.asarray(t, np.float32)
                                     for t in winograd_transforms(m, width))
    empty = jnp.zeros((0, 0), jnp.float32)   # an empty operand: not applied
    scale, shift = (part.astype(jnp.float32) for part in input_affine or (empty, empty))
    batch = x.shape[0]
    call = jax.ffi.ffi_call(TARGET, (
        jax.ShapeDtypeStruct((batch, phases * out_length, channels_out), jnp.float32),
        jax.ShapeDtypeStruct((batch, 2, channels_out), jnp.float32)))
    return call(x.astype(jnp.float32), filters, bias.astype(jnp.float32), scale, shift,
                empty[None] if residual is None else residual.astype(jnp.float32),
                jnp.asarray(transform_bt), jnp.asarray(transform_at),
                pads=np.asarray(pads, np.int64))


def eligible(dtype, arrays=()) -> bool:
    """Whether the kernel can run here: f32 compute, CPU, every array on one device, and it
    loads."""
    return (jnp.dtype(dtype) == jnp.float32 and native.runs_on_cpu(arrays) and load())


def usable(dtype, fields: dict, measure: Callable[[], dict[str, float]], arrays=()) -> bool:
    """Whether to run the kernel: `eligible`, and either UNIECG_WINOGRAD_KERNEL=1 forces it or
    `measure()` (-> {"kernel": s, "xla": s}, the caller's workload both ways) found it faster by
    `native.KERNEL_MARGIN`, once per `fields` (the workload's description) on this CPU, jax
    version and kernel source; the decision is cached on disk."""
    if not eligible(dtype, arrays):
        return False
    if _forced():
        return True
    key = native.decision_key({"source": native.source_hash(_SOURCE), **fields})
    return native.cached_decision("winograd_conv", key, fields, measure)


def time_both(sides: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best seconds of the "kernel" and "xla" calls (`native.time_sides`, this kernel's budget)."""
    return native.time_sides(sides, CALIBRATION_REPEATS, CALIBRATION_BUDGET_S, 2,
                             CALIBRATION_DELAY_S)
