"""Small-batch f32 matmul on CPU (M = 2..8 rows) for KV-cache decoding, as an XLA FFI custom call.

    if small_batch_matmul.load():                     # compiles once per machine, then cached
        packed = small_batch_matmul.pack(kernel)      # [K, N] -> [ceil(N/32), K, 32], once
        y = small_batch_matmul.matmul(x, packed, n=kernel.shape[1])   # x [M, K] -> [M, N] f32

Why: a batch-8 f32 decode step is ~85% [8, K] x [K, N] matmuls, which XLA:CPU runs at 7-15 GB/s
of weights (its GEMM kernels re-pack the weights on every call and are tuned for large M); the
kernel in small_batch_matmul.cc reads pre-packed column tiles once at ~20 GB/s per core, 1.3-3x
faster per matmul on a 2-core AVX-512 host. `decoding.generate` packs the decoder's kernels once per
call and uses it for f32 models on one CPU device with 2..8 rows (see `usable`), by injecting it into
every `DenseGeneral` of the decode step from outside (`packed_dense_kernels`,
`packed_kernels_injected`): the layers themselves know nothing of this kernel.

The C++ source is compiled on first use with the host's C++ compiler (`$CXX`, else c++ / g++) and
`-march=native`, into `$UNIECG_KERNEL_CACHE` (default ~/.cache/uniecg_jax/kernels), keyed by the
source, jaxlib version and CPU. Without a compiler, or with UNIECG_SMALL_BATCH_KERNEL=0, `load()` is
False and callers keep XLA's own dot.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.layers.linear import DenseGeneral

TILE = 32                     # columns per packed tile (small_batch_matmul.cc: kTile)
MAX_ROWS = 8
TARGET = "uniecg_small_batch_matmul"
_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
_log = logging.getLogger(__name__)
_library = None      # the loaded shared library, kept for the life of the process


def _cpu_signature() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cxx: str) -> pathlib.Path:
    """Compiles the kernel (once per source / jaxlib / CPU) and returns the shared library path."""
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
             f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), jax.__version__.encode(),
                                     " ".join([cxx] + flags).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("UNIECG_KERNEL_CACHE",
                                        pathlib.Path.home() / ".cache" / "uniecg_jax" / "kernels"))
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
    if os.environ.get("UNIECG_SMALL_BATCH_KERNEL", "1") == "0":
        return False
    cxx = _compiler()
    if cxx is None:
        _log.warning("small_batch_matmul: no C++ compiler found; decoding uses XLA's dot")
        return False
    global _library
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


def usable(compute_dtype, param_dtype, rows: int, arrays=()) -> bool:
    """Whether decoding `rows` rows of an f32 model whose params are `arrays` should use the kernel:
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



# --- Injection into DenseGeneral (decoding) ---------------------------------------------------------
# Module path (names from the root, e.g. ("layers_0", "attention", "query")) -> packed kernel.
PackedKernels = dict[tuple[str, ...], jax.Array]


def _is_dense_contract(context: nn.module.InterceptorContext) -> bool:
    return isinstance(context.module, DenseGeneral) and context.method_name == "contract"


def packed_dense_kernels(model: nn.Module, params: dict, *inputs: Any) -> PackedKernels:
    """`pack` of the kernel of every `DenseGeneral` that `model.apply({"params": params}, *inputs)`
    calls, keyed by module path: a second copy of those weights, built once per generate call.

    The layers are found by an abstract run (`jax.eval_shape`: nothing enters the caller's graph
    but the packing itself). Layers whose kernel the params tree holds stacked (inside `nn.scan`,
    where a layer sees one slice of it) are left out and keep XLA's dot.
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
    packed = {}
    for path, (num_contracted, shape) in seen.items():
        kernel = params
        for name in (*path, "kernel"):
            kernel = kernel.get(name) if hasattr(kernel, "get") else None
        if kernel is not None and tuple(kernel.shape) == tuple(shape):
            packed[path] = pack(kernel.reshape(math.prod(shape[:num_contracted]), -1))
    return packed


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
