"""Small-batch f32 matmul on CPU (M = 1..8 rows) for KV-cache decoding, as an XLA FFI custom call.

    if small_batch_matmul.load():                     # compiles once per machine, then cached
        packed = small_batch_matmul.pack(kernel)      # [K, N] -> [ceil(N/32), K, 32], once
        y = small_batch_matmul.matmul(x, packed, n=kernel.shape[1])   # x [M, K] -> [M, N] f32

Why: a batch-8 f32 decode step is ~85% [8, K] x [K, N] matmuls, which XLA:CPU runs at 7-15 GB/s
of weights (its GEMM kernels re-pack the weights on every call and are tuned for large M); the
kernel in small_batch_matmul.cc reads pre-packed column tiles once at ~20 GB/s per core, 1.3-3x
faster per matmul on a 2-core AVX-512 host. `decoding.generate` packs the decoder's kernels once per
call and uses it for f32 models on one CPU device with 1..8 rows where `usable` says it wins, by
injecting it into every `DenseGeneral` of the decode step from outside (`packed_dense_kernels`,
`packed_kernels_injected`): the layers themselves know nothing of this kernel.

Where it wins is measured, not assumed (issue 19: tuned on an Intel Xeon with AVX-512/AMX, it ran
batch-8 decoding 5x slower than XLA's dot on a 2-core AMD EPYC with AVX2 only): on first use per
(CPU, jax version, kernel source, rows, Dense shapes of the model) `calibrate` times the kernel
against XLA's dot on those shapes (1-3 s, mostly compiling) and caches the decision as JSON beside
the compiled kernel. UNIECG_SMALL_BATCH_KERNEL=1 / =0 forces the kernel on / off without measuring.

The C++ source is compiled on first use with the host's C++ compiler (`$CXX`, else c++ / g++) and
`-march=native`, into `$UNIECG_KERNEL_CACHE` (default `kernels/` in the cache home, `$UNIECG_CACHE`
or ~/.cache/uniecg_jax), keyed by the source, jaxlib version and CPU. Without a compiler, or with
UNIECG_SMALL_BATCH_KERNEL=0, `load()` is False and callers keep XLA's own dot.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.kernels import native
from uniecg_jax.layers.linear import DenseGeneral

TILE = 32                     # columns per packed tile (small_batch_matmul.cc: kTile)
MAX_ROWS = 8
TARGET = "uniecg_small_batch_matmul"
_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
# The host's description lives in native.py (shared with decode_attention); re-exported for callers.
cpu_model, cpu_isa, isa_caps, kernel_march = (native.cpu_model, native.cpu_isa, native.isa_caps,
                                              native.kernel_march)


def _source_hash() -> str:
    return native.source_hash(_SOURCE)


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """True once the kernel is compiled and registered as an XLA CPU FFI target; False (with one
    warning) where it cannot be, or when UNIECG_SMALL_BATCH_KERNEL=0."""
    if _forced() is False:
        return False
    return native.load_library(_SOURCE, {"UniecgSmallBatchMatmul": TARGET})


def pack(kernel: jax.Array) -> jax.Array:
    """kernel [K, N] f32 -> packed column tiles [ceil(N / 32), K, 32] (zero-padded)."""
    depth, width = kernel.shape
    tiles = -(-width // TILE)
    padded = jnp.pad(kernel.astype(jnp.float32), ((0, 0), (0, tiles * TILE - width)))
    return padded.reshape(depth, tiles, TILE).transpose(1, 0, 2)


def matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """x [M, K] f32 (M <= 8) . the packed [K, n] kernel -> [M, n] f32. Requires `load()`."""
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"small_batch_matmul: x must be [M <= {MAX_ROWS}, K], got {x.shape}")
    if packed.shape != (-(-n // TILE), x.shape[1], TILE):
        raise ValueError(f"small_batch_matmul: packed {packed.shape} is not a [{x.shape[1]}, {n}] "
                         "kernel packed by pack()")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x.astype(jnp.float32), packed)


def _forced() -> bool | None:
    """UNIECG_SMALL_BATCH_KERNEL: "1" True (kernel wherever eligible), "0" False, else None
    (measure)."""
    return {"0": False, "1": True}.get(os.environ.get("UNIECG_SMALL_BATCH_KERNEL", "").strip())


def eligible(compute_dtype, param_dtype, rows: int, arrays=()) -> bool:
    """Whether the kernel can run for decoding `rows` rows of a model whose params are `arrays`:
    the default backend is CPU, compute and params are f32, 1 <= rows <= 8 (one row too: with the
    next tile prefetched the kernel streams a decode step's weights faster than XLA's matrix-vector
    product on a 2-core Xeon, 5.9-6.3 vs 7.1 ms; the calibration decides per CPU), every array
    lives on one device (the custom call has no sharding rule), and the kernel loads."""
    if not 1 <= rows <= MAX_ROWS or not native.runs_on_cpu(arrays):
        return False
    if jnp.dtype(compute_dtype) != jnp.float32 or jnp.dtype(param_dtype) != jnp.float32:
        return False
    return load()


def usable(compute_dtype, param_dtype, rows: int, arrays=(),
           shapes: Sequence[tuple[int, int]] | Callable[[], Sequence[tuple[int, int]]] = ()
           ) -> bool:
    """Whether decoding should use the kernel: it is `eligible`, and either
    UNIECG_SMALL_BATCH_KERNEL=1 forces it or `calibrate(rows, shapes)` measured it faster than
    XLA's dot on this CPU.

    shapes: the [K, N] of every Dense matmul of one decode step (`dense_matmul_shapes`), or a
      zero-argument callable returning them, called only when the kernel is eligible (finding them
      traces the model). No shapes: nothing to measure, False unless forced.
    """
    if not eligible(compute_dtype, param_dtype, rows, arrays):
        return False
    if _forced():
        return True
    shapes = shapes() if callable(shapes) else shapes
    return bool(shapes) and calibrate(rows, shapes)


# --- Calibration: the kernel only where it is measured to beat XLA's dot --------------------------
# Test hook: seconds added inside every timed call of one side ("kernel" / "xla") of `_measure`, to
# make that side slower; zero outside tests.
CALIBRATION_DELAY_S = {"kernel": 0.0, "xla": 0.0}
CALIBRATION_REPEATS = 7        # timed calls per side at most (best taken) ...
CALIBRATION_BUDGET_S = 1.0     # ... stopping after 2 once this much time has gone
_COPY_BYTES = 16 << 20         # per shape, distinct weight copies up to this many bytes (_measure)


def _shape_family(rows: int, shapes: Sequence[tuple[int, int]]) -> dict:
    """{"rows": rows, "shapes": [[K, N, count], ...] sorted}: what one calibration measures."""
    counts: dict[tuple[int, int], int] = {}
    for depth, width in shapes:
        counts[(int(depth), int(width))] = counts.get((int(depth), int(width)), 0) + 1
    return {"rows": int(rows), "shapes": [[k, n, c] for (k, n), c in sorted(counts.items())]}


def calibration_key(rows: int, shapes: Sequence[tuple[int, int]]) -> str:
    """Hex key of one decision (`native.decision_key`: CPU model, ISA flags and caps, core count,
    jax version) for this kernel's source and shape family (rows; each Dense [K, N] with its
    count)."""
    return native.decision_key({"source": _source_hash(), **_shape_family(rows, shapes)})


def calibrate(rows: int, shapes: Sequence[tuple[int, int]]) -> bool:
    """True when the kernel ran `rows` x every Dense [K, N] in `shapes` faster than XLA's dot here
    (by `native.KERNEL_MARGIN`).

    Measured (`_measure`: 1-3 s, mostly compiling) once per `calibration_key`, then read from
    `small_batch_matmul-choice-<key>.json` in the kernel cache (`native.cached_decision`: a new CPU,
    jax version or kernel source is a new key, so a new measurement). False where the kernel does
    not `load()`.
    """
    if not load():
        return False
    return native.cached_decision("small_batch_matmul", calibration_key(rows, shapes),
                                  _shape_family(rows, shapes), lambda: _measure(rows, shapes))


def _measure(rows: int, shapes: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Seconds of one decode step's Dense matmuls ([rows, K] x [K, N] for each of `shapes`), for
    "kernel" (`matmul` on packed weights) and "xla" (`jnp.dot`, what the layers do without it).

    Each side is one jitted call doing every matmul of the step: a shape's `count` matmuls cycle
    over `copies` distinct weights (up to `_COPY_BYTES`, so that small weights stream from memory
    as the real step's distinct layers do, not from a warm L1) in a loop (compiling one unrolled
    matmul per layer took seconds), each with its own x. Each side's best call over repeats, the
    sides alternating call by call (a noisy spell of a shared host slows both, not one).
    """
    rng = np.random.default_rng(0)
    xs, weights, packs, plan = [], [], [], []
    for depth, width, count in _shape_family(rows, shapes)["shapes"]:
        copies = max(d for d in range(1, count + 1)
                     if count % d == 0 and (d == 1 or d * 4 * depth * width <= _COPY_BYTES))
        w = rng.random((copies, depth, width), np.float32) - 0.5
        tiles = -(-width // TILE)
        padded = np.pad(w, ((0, 0), (0, 0), (0, tiles * TILE - width)))
        packs.append([jnp.asarray(padded[c].reshape(depth, tiles, TILE).transpose(1, 0, 2))
                      for c in range(copies)])
        weights.append([jnp.asarray(w[c]) for c in range(copies)])
        xs.append(jnp.asarray(rng.random((count, rows, depth), np.float32) - 0.5))
        plan.append((width, count, copies))

    def step(use_kernel, xs, weights):
        outs = []
        for (width, count, copies), x, ws in zip(plan, xs, weights):
            def body(i, out, x=x, ws=ws, width=width, copies=copies):
                for c, w in enumerate(ws):
                    xj = jax.lax.dynamic_index_in_dim(x, i * copies + c, keepdims=False)
                    y = matmul(xj, w, width) if use_kernel else jnp.dot(xj, w)
                    out = jax.lax.dynamic_update_index_in_dim(out, y, i * copies + c, 0)
                return out
            outs.append(jax.lax.fori_loop(0, count // copies, body,
                                          jnp.zeros((count, rows, width), jnp.float32)))
        return outs
    kernel_step, xla_step = (jax.jit(functools.partial(step, side)) for side in (True, False))
    return native.time_sides({"kernel": lambda: kernel_step(xs, packs),
                              "xla": lambda: xla_step(xs, weights)},
                             CALIBRATION_REPEATS, CALIBRATION_BUDGET_S, 2, CALIBRATION_DELAY_S)


# --- Injection into DenseGeneral (decoding) ---------------------------------------------------------
# Module path (names from the root, e.g. ("layers_0", "attention", "query")) -> packed kernel.
PackedKernels = dict[tuple[str, ...], jax.Array]


def _is_dense_contract(context: nn.module.InterceptorContext) -> bool:
    return isinstance(context.module, DenseGeneral) and context.method_name == "contract"


def _dense_kernels(model: nn.Module, params: dict, *inputs: Any
                   ) -> dict[tuple[str, ...], tuple[jax.Array, tuple[int, int]]]:
    """The kernel of every `DenseGeneral` that `model.apply({"params": params}, *inputs)` calls,
    keyed by module path, with the [K, N] matrix it is as a matmul.

    The layers are found by an abstract run (`jax.eval_shape`: nothing enters the caller's graph).
    Layers whose kernel the params tree holds stacked (inside `nn.scan`, where a layer sees one
    slice of it) are left out and keep XLA's dot.
    """
    params = nn.meta.unbox(params)
    seen: dict[tuple[str, ...], tuple[int, tuple[int, ...]]] = {}

    def record(next_fun, args, kwargs, context):
        if _is_dense_contract(context):
            x, kernel = args
            seen[context.module.path] = (_num_contracted(context.module, kernel), kernel.shape)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, *xs: model.apply({"params": p}, *xs), params, *inputs)
    kernels = {}
    for path, (num_contracted, shape) in seen.items():
        kernel = params
        for name in (*path, "kernel"):
            kernel = kernel.get(name) if hasattr(kernel, "get") else None
        if kernel is not None and tuple(kernel.shape) == tuple(shape):
            kernels[path] = (kernel, (math.prod(shape[:num_contracted]),
                                      math.prod(shape[num_contracted:])))
    return kernels


def packed_dense_kernels(model: nn.Module, params: dict, *inputs: Any) -> PackedKernels:
    """`pack` of the kernel of every `DenseGeneral` that `model.apply({"params": params}, *inputs)`
    calls (`_dense_kernels`: scanned layers left out), keyed by module path: a second copy of those
    weights, built once per generate call."""
    return {path: pack(kernel.reshape(shape))
            for path, (kernel, shape) in _dense_kernels(model, params, *inputs).items()}


_shapes_memo: dict = {}


def dense_matmul_shapes(model: nn.Module, params: dict, *inputs: Any
                        ) -> tuple[tuple[int, int], ...]:
    """[K, N] of every matmul that
    `packed_kernels_injected(packed_dense_kernels(model, params, *inputs))` hands the kernel in
    `model.apply({"params": params}, *inputs)`, one per layer in call order (remembered per model,
    params shapes and input shapes: finding them traces the model)."""
    key = (model, jax.tree.structure(params),
           tuple((tuple(np.shape(leaf)), str(getattr(leaf, "dtype", ""))) for leaf in
                 jax.tree.leaves(params) + jax.tree.leaves(inputs)))
    if key not in _shapes_memo:
        _shapes_memo[key] = tuple(shape for _, shape in
                                  _dense_kernels(model, params, *inputs).values())
    return _shapes_memo[key]


def _num_contracted(layer: DenseGeneral, kernel: jax.Array) -> int:
    return kernel.ndim - (1 if isinstance(layer.features, int) else len(layer.features))


@contextlib.contextmanager
def packed_kernels_injected(packed: PackedKernels | None):
    """Within this context (while tracing a model call), every `DenseGeneral` whose kernel is in
    `packed` computes `x . kernel` with `matmul` on its packed kernel when it has 1..MAX_ROWS rows
    in f32; every other matmul keeps XLA's dot. `packed=None`: no injection."""
    if packed is None:
        yield
        return

    def inject(next_fun, args, kwargs, context):
        if _is_dense_contract(context) and context.module.path in packed:
            layer = context.module
            x, kernel = args
            num_contracted = _num_contracted(layer, kernel)
            batch_shape = x.shape[:x.ndim - num_contracted]
            features = kernel.shape[num_contracted:]
            rows = math.prod(batch_shape)
            if 1 <= rows <= MAX_ROWS and jnp.dtype(layer.dtype) == jnp.float32:
                depth = math.prod(kernel.shape[:num_contracted])
                y = matmul(x.reshape(rows, depth), packed[layer.path], math.prod(features))
                return y.reshape(batch_shape + features).astype(layer.out_dtype or layer.dtype)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(inject):
        yield
