"""Small-batch f32 matmul on CPU (M = 2..8 rows) for KV-cache decoding, as an XLA FFI custom call.

    if small_batch_matmul.load():                     # compiles once per machine, then cached
        packed = small_batch_matmul.pack(kernel)      # [K, N] -> [ceil(N/32), K, 32], once
        y = small_batch_matmul.matmul(x, packed, n=kernel.shape[1])   # x [M, K] -> [M, N] f32

Why: a batch-8 f32 decode step is ~85% [8, K] x [K, N] matmuls, which XLA:CPU runs at 7-15 GB/s
of weights (its GEMM kernels re-pack the weights on every call and are tuned for large M); the
kernel in small_batch_matmul.cc reads pre-packed column tiles once at ~20 GB/s per core, 1.3-3x
faster per matmul on a 2-core AVX-512 host. `decoding.generate` packs the decoder's kernels once per
call and uses it for f32 models on one CPU device with 2..8 rows where `usable` says it wins, by
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
import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import platform
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.caches import cache_home
from uniecg_jax.layers.linear import DenseGeneral

TILE = 32                     # columns per packed tile (small_batch_matmul.cc: kTile)
MAX_ROWS = 8
TARGET = "uniecg_small_batch_matmul"
_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
_log = logging.getLogger(__name__)
_library = None      # the loaded shared library, kept for the life of the process


def _cpuinfo_field(*names: str) -> str | None:
    """The first /proc/cpuinfo line starting with one of `names`, whole; None without one."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(names):
                return line
    except OSError:
        pass
    return None


def _cpu_signature() -> str:
    """The CPU's ISA flags line (what `-march=native` compiles for)."""
    return _cpuinfo_field("flags", "Features") or platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 7B13" (platform.processor() where /proc has none)."""
    line = _cpuinfo_field("model name", "Model", "Hardware")
    return (line.split(":", 1)[1].strip() if line and ":" in line
            else platform.processor() or platform.machine())


def cpu_isa() -> list[str]:
    """The matmul-relevant ISA extensions the CPU reports: of AVX2, AVX-512 (avx512f), AMX."""
    flags = set(_cpu_signature().split())
    return [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile"))
            if flag in flags]


def isa_caps() -> dict[str, str]:
    """The ISA limits set for this process, by tool: XLA's `--xla_cpu_max_isa`, PyTorch's
    `ATEN_CPU_CAPABILITY` and the kernel's `UNIECG_KERNEL_MARCH` (default `native`). Setting all
    three (e.g. AVX2 / avx2 / x86-64-v3) measures an AVX2-only host's code paths on a newer CPU."""
    xla = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    caps = {"xla": xla.group(1) if xla else "", "torch": os.environ.get("ATEN_CPU_CAPABILITY", ""),
            "kernel": kernel_march()}
    return {tool: cap for tool, cap in caps.items() if cap and cap != "native"}


def kernel_march() -> str:
    """The `-march=` the kernel is compiled for: $UNIECG_KERNEL_MARCH, else `native`."""
    return os.environ.get("UNIECG_KERNEL_MARCH", "").strip() or "native"


def _cache_dir() -> pathlib.Path:
    """$UNIECG_KERNEL_CACHE, else `kernels/` under the one cache home (`caches.cache_home()`)."""
    return pathlib.Path(os.environ.get("UNIECG_KERNEL_CACHE", cache_home() / "kernels"))


def _source_hash() -> str:
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cxx: str) -> pathlib.Path:
    """Compiles the kernel (once per source / jaxlib / CPU) and returns the shared library path."""
    flags = ["-O3", f"-march={kernel_march()}", "-std=c++17", "-shared", "-fPIC", "-w",
             f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), jax.__version__.encode(),
                                     " ".join([cxx] + flags).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    cache = _cache_dir()
    library = cache / f"small_batch_matmul-{key}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = pathlib.Path(tmp) / library.name
            subprocess.run([cxx, *flags, str(_SOURCE), "-o", str(built)], check=True,
                           capture_output=True, text=True)
            os.replace(built, library)     # atomic: concurrent builders never see a partial file
    return library


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """True once the kernel is compiled and registered as an XLA CPU FFI target; False (with one
    warning) where it cannot be, or when UNIECG_SMALL_BATCH_KERNEL=0."""
    global _library
    if _forced() is False:
        return False
    if _library is not None:      # registered already (an XLA target cannot be registered twice)
        return True
    cxx = _compiler()
    if cxx is None:
        _log.warning("small_batch_matmul: no C++ compiler found; decoding uses XLA's dot")
        return False
    try:
        _library = library = ctypes.cdll.LoadLibrary(str(_build(cxx)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        _log.warning("small_batch_matmul: could not build %s (%s); decoding uses XLA's dot",
                     _SOURCE, str(detail).strip()[-500:])
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.UniecgSmallBatchMatmul),
                                platform="cpu")
    return True


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
    the default backend is CPU, compute and params are f32, 2 <= rows <= 8 (one row is a
    matrix-vector product, which XLA already streams at memory speed), every array lives on one
    device (the custom call has no sharding rule), and the kernel loads."""
    if jax.default_backend() != "cpu" or not 2 <= rows <= MAX_ROWS:
        return False
    if jnp.dtype(compute_dtype) != jnp.float32 or jnp.dtype(param_dtype) != jnp.float32:
        return False
    for leaf in jax.tree.leaves(arrays):
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
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
# The kernel must beat XLA's dot by 5%: a tie within a noisy host's spread keeps the compiler's dot.
KERNEL_MARGIN = 0.95
_decisions: dict[str, bool] = {}   # calibration_key -> use the kernel; the on-disk cache's memo


def _shape_family(rows: int, shapes: Sequence[tuple[int, int]]) -> dict:
    """{"rows": rows, "shapes": [[K, N, count], ...] sorted}: what one calibration measures."""
    counts: dict[tuple[int, int], int] = {}
    for depth, width in shapes:
        counts[(int(depth), int(width))] = counts.get((int(depth), int(width)), 0) + 1
    return {"rows": int(rows), "shapes": [[k, n, c] for (k, n), c in sorted(counts.items())]}


def calibration_key(rows: int, shapes: Sequence[tuple[int, int]]) -> str:
    """Hex key of one decision: CPU model, ISA flags, core count, jax version, kernel source hash
    and the shape family (rows; each Dense [K, N] with its count)."""
    what = {"cpu": cpu_model(), "flags": _cpu_signature(), "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "jax": jax.__version__, "source": _source_hash(), "isa_caps": isa_caps(),
            **_shape_family(rows, shapes)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def calibrate(rows: int, shapes: Sequence[tuple[int, int]]) -> bool:
    """True when the kernel ran `rows` x every Dense [K, N] in `shapes` faster than XLA's dot here
    (by `KERNEL_MARGIN`).

    Measured (`_measure`: 1-3 s, mostly compiling) once per `calibration_key`, then read from
    `small_batch_matmul-choice-<key>.json` in the kernel cache (a new CPU, jax version or kernel
    source is a new key, so a new measurement; deleting the file measures again). False where the
    kernel does not `load()`.
    """
    if not load():
        return False
    key = calibration_key(rows, shapes)
    if key in _decisions:
        return _decisions[key]
    path = _cache_dir() / f"small_batch_matmul-choice-{key}.json"
    try:
        decision = json.loads(path.read_text())["use_kernel"]
        if not isinstance(decision, bool):
            raise TypeError(decision)
    except (OSError, ValueError, KeyError, TypeError):
        seconds = _measure(rows, shapes)
        decision = bool(seconds["kernel"] < KERNEL_MARGIN * seconds["xla"])
        record = {"use_kernel": decision, "kernel_s": seconds["kernel"], "xla_s": seconds["xla"],
                  "cpu": cpu_model(), "isa": cpu_isa(), "isa_caps": isa_caps(),
                  "jax": jax.__version__,
                  **_shape_family(rows, shapes)}
        _log.info("small_batch_matmul: %s on %s for %s (kernel %.3g s, XLA's dot %.3g s a step)",
                  "kernel" if decision else "XLA's dot", record["cpu"], _shape_family(rows, shapes),
                  seconds["kernel"], seconds["xla"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                             suffix=".tmp") as tmp:
                json.dump(record, tmp, indent=1)
            os.replace(tmp.name, path)   # atomic: a concurrent reader never sees a partial file
        except OSError as error:
            _log.warning("small_batch_matmul: could not cache the calibration (%s)", error)
    _decisions[key] = decision
    return decision


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
    sides = {"kernel": (jax.jit(functools.partial(step, True)), xs, packs),
             "xla": (jax.jit(functools.partial(step, False)), xs, weights)}
    for fn, *args in sides.values():             # compile and warm up
        jax.block_until_ready(fn(*args))
    best = {"kernel": math.inf, "xla": math.inf}
    start = time.perf_counter()
    for repeat in range(CALIBRATION_REPEATS):
        if repeat >= 2 and time.perf_counter() - start > CALIBRATION_BUDGET_S:
            break
        for side in (("kernel", "xla") if repeat % 2 == 0 else ("xla", "kernel")):
            fn, *args = sides[side]
            begin = time.perf_counter()
            jax.block_until_ready(fn(*args))
            if CALIBRATION_DELAY_S[side]:
                time.sleep(CALIBRATION_DELAY_S[side])
            best[side] = min(best[side], time.perf_counter() - begin)
    return best


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
    `packed` computes `x . kernel` with `matmul` on its packed kernel when it has 2..MAX_ROWS rows
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
            if 2 <= rows <= MAX_ROWS and jnp.dtype(layer.dtype) == jnp.float32:
                depth = math.prod(kernel.shape[:num_contracted])
                y = matmul(x.reshape(rows, depth), packed[layer.path], math.prod(features))
                return y.reshape(batch_shape + features).astype(layer.out_dtype or layer.dtype)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(inject):
        yield
