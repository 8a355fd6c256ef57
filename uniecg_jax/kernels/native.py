"""What the hand-written CPU kernels share: the host's CPU description, building a kernel's C++
source into a cached shared library registered as XLA FFI targets, and the cached per-CPU decision
whether a kernel beats XLA's own code (each kernel measures its own way).

    library = native.load_library(SOURCE, {"UniecgSmallBatchMatmul": "uniecg_small_batch_matmul"})
    use = native.cached_decision("small_batch_matmul", key, fields, measure)   # measure() once

A kernel source is compiled on first use with the host's C++ compiler (`$CXX`, else c++ / g++ /
clang++) and `-march=native` (`$UNIECG_KERNEL_MARCH` caps it), into `$UNIECG_KERNEL_CACHE`
(default `kernels/` in the cache home, `$UNIECG_CACHE` or ~/.cache/uniecg_jax), keyed by the
source, jax version, flags and CPU; decisions are JSON files beside the libraries.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import platform
import re
import shutil
import subprocess
import tempfile
import time
from typing import Callable

import jax

from uniecg_jax.caches import cache_home

_log = logging.getLogger(__name__)
_libraries: dict[pathlib.Path, ctypes.CDLL | None] = {}   # per source, for the process's life


@functools.lru_cache(maxsize=None)
def _cpuinfo_lines() -> tuple[str, ...]:
    """/proc/cpuinfo's lines, read once per process (every `generate` call builds decision keys)."""
    try:
        return tuple(pathlib.Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def _cpuinfo_field(*names: str) -> str | None:
    """The first /proc/cpuinfo line starting with one of `names`, whole; None without one."""
    return next((line for line in _cpuinfo_lines() if line.startswith(names)), None)


def cpu_signature() -> str:
    """The CPU's ISA flags line (what `-march=native` compiles for)."""
    return _cpuinfo_field("flags", "Features") or platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 7B13" (platform.processor() where /proc has none)."""
    line = _cpuinfo_field("model name", "Model", "Hardware")
    return (line.split(":", 1)[1].strip() if line and ":" in line
            else platform.processor() or platform.machine())


def cpu_isa() -> list[str]:
    """The matmul-relevant ISA extensions the CPU reports: of AVX2, AVX-512 (avx512f), AMX."""
    flags = set(cpu_signature().split())
    return [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile"))
            if flag in flags]


def kernel_march() -> str:
    """The `-march=` the kernels are compiled for: $UNIECG_KERNEL_MARCH, else `native`."""
    return os.environ.get("UNIECG_KERNEL_MARCH", "").strip() or "native"


def isa_caps() -> dict[str, str]:
    """The ISA limits set for this process, by tool: XLA's `--xla_cpu_max_isa`, PyTorch's
    `ATEN_CPU_CAPABILITY` and the kernels' `UNIECG_KERNEL_MARCH` (default `native`). Setting all
    three (e.g. AVX2 / avx2 / x86-64-v3) measures an AVX2-only host's code paths on a newer CPU."""
    xla = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    caps = {"xla": xla.group(1) if xla else "", "torch": os.environ.get("ATEN_CPU_CAPABILITY", ""),
            "kernel": kernel_march()}
    return {tool: cap for tool, cap in caps.items() if cap and cap != "native"}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cache_dir() -> pathlib.Path:
    """$UNIECG_KERNEL_CACHE, else `kernels/` under the one cache home (`caches.cache_home()`)."""
    return pathlib.Path(os.environ.get("UNIECG_KERNEL_CACHE", cache_home() / "kernels"))


@functools.lru_cache(maxsize=None)
def _source_bytes(source: pathlib.Path) -> bytes:
    """A kernel's source and the kernels' shared headers (`*.h` beside it, e.g. shared_work.h)."""
    return b"\0".join([source.read_bytes()] + [header.read_bytes()
                                                for header in sorted(source.parent.glob("*.h"))])


@functools.lru_cache(maxsize=None)
def source_hash(source: pathlib.Path) -> str:
    """sha256 of a kernel's source with the shared headers it includes, once per process."""
    return hashlib.sha256(_source_bytes(source)).hexdigest()


def runs_on_cpu(arrays=()) -> bool:
    """Whether a CPU custom call can take `arrays`: the default backend is CPU and every array
    lives on one device (the kernels' custom calls have no sharding rule)."""
    if jax.default_backend() != "cpu":
        return False
    return all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(arrays)
               if isinstance(leaf, jax.Array))


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(source: pathlib.Path, cxx: str) -> pathlib.Path:
    """Compiles `source` (once per source / jax / flags / CPU) and returns the library's path."""
    flags = ["-O3", f"-march={kernel_march()}", "-std=c++17", "-shared", "-fPIC", "-w",
             f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(b"\0".join([_source_bytes(source), jax.__version__.encode(),
                                     " ".join([cxx] + flags).encode(),
                                     cpu_signature().encode()])).hexdigest()[:16]
    cache = cache_dir()
    library = cache / f"{source.stem}-{key}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = pathlib.Path(tmp) / library.name
            subprocess.run([cxx, *flags, str(source), "-o", str(built)], check=True,
                           capture_output=True, text=True)
            os.replace(built, library)     # atomic: concurrent builders never see a partial file
    return library


def load_library(source: pathlib.Path, targets: dict[str, str]) -> bool:
    """Builds `source` and registers each exported handler symbol as the CPU FFI target it maps to
    (`{symbol: target}`); True once done (per process), False with one warning where no compiler
    is found or the build fails (callers keep XLA's own code)."""
    if source in _libraries:      # an XLA target cannot be registered twice
        return _libraries[source] is not None
    cxx = compiler()
    library = None
    if cxx is None:
        _log.warning("%s: no C++ compiler found; XLA's own code is used instead", source.name)
    else:
        try:
            library = ctypes.cdll.LoadLibrary(str(build(source, cxx)))
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            _log.warning("%s: could not build (%s); XLA's own code is used instead", source.name,
                         str(detail).strip()[-500:])
    if library is not None:
        for symbol, target in targets.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    _libraries[source] = library
    return library is not None


def library(source: pathlib.Path) -> ctypes.CDLL | None:
    """The library `load_library` built from `source` (None: not loaded), for plain C symbols."""
    return _libraries.get(source)


def decision_key(fields: dict) -> str:
    """Hex key of one kernel-vs-XLA decision: CPU model, ISA flags and caps, core count and jax
    version, plus the kernel's own `fields` (its source hash and the shapes it was measured on)."""
    what = {"cpu": cpu_model(), "flags": cpu_signature(), "cores": cores(),
            "jax": jax.__version__, "isa_caps": isa_caps(), **fields}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


_decisions: dict[str, bool] = {}   # "<name>-<key>" -> use the kernel; the on-disk cache's memo
# A kernel must beat XLA by 5%: a tie within a noisy host's spread keeps the compiler's code.
KERNEL_MARGIN = 0.95


def cached_decision(name: str, key: str, fields: dict,
                    measure: Callable[[], dict[str, float]]) -> bool:
    """Whether kernel `name` beats XLA here: `measure()` -> {"kernel": s, "xla": s} once per `key`
    (the kernel must be faster by `KERNEL_MARGIN`), then read from `<name>-choice-<key>.json` in
    the kernel cache (deleting the file measures again; a corrupt file is measured again)."""
    memo = f"{name}-{key}"
    if memo in _decisions:
        return _decisions[memo]
    path = cache_dir() / f"{name}-choice-{key}.json"
    try:
        decision = json.loads(path.read_text())["use_kernel"]
        if not isinstance(decision, bool):
            raise TypeError(decision)
    except (OSError, ValueError, KeyError, TypeError):
        seconds = measure()
        decision = bool(seconds["kernel"] < KERNEL_MARGIN * seconds["xla"])
        record = {"use_kernel": decision, "kernel_s": seconds["kernel"], "xla_s": seconds["xla"],
                  "cpu": cpu_model(), "isa": cpu_isa(), "isa_caps": isa_caps(),
                  "jax": jax.__version__, **fields}
        _log.info("%s: %s on %s for %s (kernel %.3g s, XLA %.3g s)", name,
                  "kernel" if decision else "XLA", record["cpu"], fields, seconds["kernel"],
                  seconds["xla"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                             suffix=".tmp") as tmp:
                json.dump(record, tmp, indent=1)
            os.replace(tmp.name, path)   # atomic: a concurrent reader never sees a partial file
        except OSError as error:
            _log.warning("%s: could not cache the calibration (%s)", name, error)
    _decisions[memo] = decision
    return decision


def time_sides(sides: dict[str, Callable[[], object]], repeats: int, budget_s: float,
               min_repeats: int = 2, delays: dict[str, float] | None = None) -> dict[str, float]:
    """Best seconds of each blocking call in `sides` ("kernel", "xla"), after one untimed call
    each (compiling), the sides alternating call by call (a noisy spell of a shared host slows
    both, not one); up to `repeats` rounds, stopping after `min_repeats` once `budget_s` has gone.
    `delays` (a test hook): seconds added inside each timed call of a side, to make it slower."""
    for fn in sides.values():
        jax.block_until_ready(fn())
    names = list(sides)
    best = {name: math.inf for name in names}
    start = time.perf_counter()
    for repeat in range(repeats):
        if repeat >= min_repeats and time.perf_counter() - start > budget_s:
            break
        for name in (names if repeat % 2 == 0 else names[::-1]):
            begin = time.perf_counter()
            jax.block_until_ready(sides[name]())
            if delays and delays.get(name):
                time.sleep(delays[name])
            best[name] = min(best[name], time.perf_counter() - begin)
    return best
