"""The per-user cache home (`$UNIECG_CACHE`, default ~/.cache/uniecg_jax) and what lives there:
JAX's persistent compilation cache (so a second `uniecg interpret` skips compiling) and per-host
measurements such as the CPU's peak FLOP/s (train/loop.py's MFU)."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

CACHE_ENV = "UNIECG_CACHE"
# Set to 0 to keep the CLI from persisting compiled executables.
COMPILATION_CACHE_ENV = "UNIECG_COMPILATION_CACHE"


def cache_home() -> pathlib.Path:
    """`$UNIECG_CACHE`, else ~/.cache/uniecg_jax (not created here). Also the synthetic-ECG cache's
    default (`data.synthetic.default_cache_dir`)."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "uniecg_jax")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Persists compiled executables in `directory` (local or gs://; default `cache_home()/jax`), so
    a restarted run or a repeated command of the same model skips compilation (minutes for a 7B
    model, seconds on CPU). Returns the directory, or None when `$UNIECG_COMPILATION_CACHE=0` turns
    the default off."""
    import jax  # here, not at the top: data/ reads cache_home() and must not pull in JAX

    if directory is None:
        if os.environ.get(COMPILATION_CACHE_ENV, "1").strip().lower() in ("0", "false", "no"):
            return None
        directory = str(cache_home() / "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every executable is worth keeping for a CLI call: the tiny ones still compile for seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def read_host_value(name: str, key: str) -> Any:
    """The value stored under `key` in `cache_home()/name` (a JSON object), or None when absent or
    unreadable (a damaged cache file is measured again, never an error)."""
    try:
        with open(cache_home() / name) as f:
            values = json.load(f)
    except (OSError, ValueError):
        return None
    return values.get(key) if isinstance(values, dict) else None


def write_host_value(name: str, key: str, value: Any) -> None:
    """Stores `value` under `key` in `cache_home()/name` (written to a temp file, then renamed).
    A read-only home is not an error: the value is just measured again next time."""
    path = cache_home() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path) as f:
                values = json.load(f)
            values = values if isinstance(values, dict) else {}
        except (OSError, ValueError):
            values = {}
        values[key] = value
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        with open(temporary, "w") as f:
            json.dump(values, f, indent=1)
        os.replace(temporary, path)
    except OSError:
        pass
