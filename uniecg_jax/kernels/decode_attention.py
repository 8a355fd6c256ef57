"""Single-query attention over the KV cache on CPU (one new token per row), as an XLA FFI call.

    if decode_attention.usable(jnp.float32, rows=8, heads=8, groups=1, head_dim=64):
        with decode_attention.injected(True):      # while tracing the decode step
            logits, cache = model.apply(...)

Why: a batch-8 f32 decode step spends ~20% of its time (3.4 of 16.5 ms, small preset, 2-core Xeon)
in the two attention contractions, which XLA:CPU runs as B x K tiny batched matrix-vector products
at ~12 GB/s, over every cache slot whether written yet or not. decode_attention.cc reads only the
written slots, once for all query heads of a kv head, with the (row, kv head) pairs shared among
XLA's intra-op threads.

Like `small_batch_matmul`, it is used only where it is measured to win (issue 19): on first use per
(CPU, jax version, kernel source, rows, heads, groups, head size) `calibrate` times it against
XLA's `grouped_attention` on those shapes and caches the decision (`native.cached_decision`).
UNIECG_DECODE_ATTENTION_KERNEL=1 / =0 forces it on / off without measuring. The layer knows
nothing of it: `injected` swaps `Attention.attend_cache` from outside.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.kernels import native
from uniecg_jax.layers.attention import Attention, attention_weights_mask, grouped_attention

TARGET = "uniecg_decode_attention"
_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
CALIBRATION_SLOTS = 256        # cache length the calibration measures at, ...
# ... 3/4 of it written: over a generation of N tokens after a prompt of P the cache (P + N slots)
# is on average (P + N / 2) / (P + N) full, between 1/2 and 1; XLA's attention reads every slot.
CALIBRATION_FILL = 0.75
CALIBRATION_REPEATS = 9        # timed calls per side at most (best taken) ...
CALIBRATION_BUDGET_S = 0.5     # ... stopping after 3 once this much time has gone
# Test hook: seconds added inside every timed call of one side ("kernel" / "xla") of `_measure`.
CALIBRATION_DELAY_S = {"kernel": 0.0, "xla": 0.0}


def _forced() -> bool | None:
    """UNIECG_DECODE_ATTENTION_KERNEL: "1" True, "0" False, else None (measure)."""
    return {"0": False, "1": True}.get(os.environ.get("UNIECG_DECODE_ATTENTION_KERNEL", "").strip())


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """True once the kernel is built and registered as a CPU FFI target; False where it cannot
    be (no compiler: one warning) or UNIECG_DECODE_ATTENTION_KERNEL=0."""
    if _forced() is False:
        return False
    return native.load_library(_SOURCE, {"UniecgDecodeAttention": TARGET})


def attend(grouped_query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array,
           num_slots: jax.Array | int) -> jax.Array:
    """Softmax attention of one query per row over the first `num_slots` cache slots whose
    key_mask is set: grouped_query [B, K, G, 1, Dh], key/value [B, K, S, Dh] f32, key_mask [B, S]
    -> context [B, K, G, 1, Dh] f32 (= `grouped_attention` with the causal mask of a query in slot
    num_slots - 1, up to float rounding). Requires `load()`."""
    batch, heads, groups, length, head_dim = grouped_query.shape
    if length != 1 or head_dim % 16 or key.shape != value.shape or key.shape[:2] != (batch, heads):
        raise ValueError(f"decode_attention: expected query [B, K, G, 1, Dh % 16 == 0] and key/value"
                         f" [B, K, S, Dh], got {grouped_query.shape}, {key.shape}, {value.shape}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((batch, heads, groups, head_dim),
                                                         jnp.float32))
    context = call(grouped_query.reshape(batch, heads, groups, head_dim).astype(jnp.float32),
                   key.astype(jnp.float32), value.astype(jnp.float32),
                   key_mask.astype(jnp.int32), jnp.asarray(num_slots, jnp.int32),
                   scale=np.float32(head_dim ** -0.5))
    return context[:, :, :, None, :]


def eligible(dtype, head_dim: int, arrays=()) -> bool:
    """Whether the kernel can run: CPU backend, f32 compute, head size a multiple of 16, every
    array on one device (the custom call has no sharding rule), and the kernel loads."""
    if jnp.dtype(dtype) != jnp.float32 or head_dim % 16 or not native.runs_on_cpu(arrays):
        return False
    return load()


def usable(dtype, rows: int, heads: int, groups: int, head_dim: int, arrays=()) -> bool:
    """`eligible`, and forced by UNIECG_DECODE_ATTENTION_KERNEL=1 or measured faster than XLA's
    attention here (`calibrate`)."""
    if not eligible(dtype, head_dim, arrays):
        return False
    return True if _forced() else calibrate(rows, heads, groups, head_dim)


def calibrate(rows: int, heads: int, groups: int, head_dim: int) -> bool:
    """True when the kernel ran one decode step's attention ([rows, heads x groups] queries, head
    size head_dim, over a cache of CALIBRATION_SLOTS slots, CALIBRATION_FILL of them written)
    faster than XLA's `grouped_attention` here; measured once per key, then cached
    (`native.cached_decision`)."""
    if not load():
        return False
    fields = {"source": native.source_hash(_SOURCE), "rows": int(rows), "heads": int(heads),
              "groups": int(groups), "head_dim": int(head_dim), "slots": CALIBRATION_SLOTS,
              "fill": CALIBRATION_FILL}
    return native.cached_decision("decode_attention", native.decision_key(fields), fields,
                                  lambda: _measure(rows, heads, groups, head_dim))


def _measure(rows: int, heads: int, groups: int, head_dim: int, layers: int = 8
             ) -> dict[str, float]:
    """Seconds of `layers` attention calls (distinct caches, as a decode step's layers read) for
    "kernel" and "xla" with CALIBRATION_FILL of the CALIBRATION_SLOTS slots written, each side's
    best over alternating repeats."""
    rng = np.random.default_rng(0)
    slots = CALIBRATION_SLOTS
    query = [jnp.asarray(rng.standard_normal((rows, heads, groups, 1, head_dim)), jnp.float32)
             for _ in range(layers)]
    # One array per layer and side (slices of one array would be copied before the custom call).
    caches = [[jnp.asarray(rng.standard_normal((rows, heads, slots, head_dim)), jnp.float32)
               for _ in range(2)] for _ in range(layers)]
    key_mask = jnp.ones((rows, slots), jnp.int32)
    written = max(1, int(CALIBRATION_FILL * slots))

    def step(use_kernel, query, caches):
        outs = []
        for layer_query, (key, value) in zip(query, caches):
            if use_kernel:
                outs.append(attend(layer_query, key, value, key_mask, written))
            else:
                allowed = attention_weights_mask(written - 1, 1, key_mask)
                outs.append(grouped_attention(layer_query, key, value, allowed, jnp.float32))
        return outs
    kernel_step, xla_step = (jax.jit(functools.partial(step, side)) for side in (True, False))
    return native.time_sides({"kernel": lambda: kernel_step(query, caches),
                              "xla": lambda: xla_step(query, caches)},
                             CALIBRATION_REPEATS, CALIBRATION_BUDGET_S, 3, CALIBRATION_DELAY_S)


@contextlib.contextmanager
def injected(enabled: bool):
    """Within this context (while tracing a model call), every `Attention.attend_cache` of one new
    token per row in f32 runs `attend` (the kernel); anything else keeps XLA's attention."""
    if not enabled:
        yield
        return

    def inject(next_fun, args, kwargs, context):
        if isinstance(context.module, Attention) and context.method_name == "attend_cache":
            grouped_query, key, value, key_mask, query_offset = args
            if (grouped_query.shape[3] == 1 and grouped_query.shape[-1] % 16 == 0
                    and jnp.dtype(context.module.dtype) == jnp.float32):
                return attend(grouped_query, key, value, key_mask, query_offset + 1)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(inject):
        yield
