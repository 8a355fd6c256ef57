"""Shared benchmark helpers: wall-clock timing and the matmul peak every MFU figure is measured
against (in the same run, on the same device)."""
from __future__ import annotations

import time
from typing import Callable

from uniecg_jax.train import loop


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Mean seconds per call after one warm-up call (`fn` must block until its work is done)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def interleaved_best(fns: dict[str, Callable[[], object]], rounds: int,
                     calls_per_turn: int = 1, warm_each_turn: bool = False) -> dict[str, float]:
    """Best (minimum) seconds per call of each blocking `fn`, after one warm-up call each.

    The functions take turns (A, B, A, B, ... for `rounds` rounds), so that a slow spell of a shared
    host hits both sides of a comparison instead of one of them; each turn times `calls_per_turn`
    calls. `warm_each_turn` adds one untimed call at the start of every turn: the first JAX train
    step after a PyTorch step ran ~30% slower here (allocator and cache state left by the other
    framework), a cost that a training loop running one framework never pays.
    """
    if not warm_each_turn:
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if warm_each_turn:
                fn()
            for _ in range(calls_per_turn):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def matmul_peak(size: int = 2048) -> dict[str, float]:
    """FLOP/s of the fastest square f32 matmul and the fastest bf16 one (bf16 or f32 accumulation),
    each the best of 7 timed runs (`train.loop.measure_cpu_peak_flops`, the peak training's MFU
    uses), so a slow spell of a shared host does not lower the peak and lift an MFU above 100%."""
    return {dtype: loop.measure_cpu_peak_flops(size=size, dtype=dtype) for dtype in ("f32", "bf16")}
