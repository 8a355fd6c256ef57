"""On-device augmentations of training batches.

    ecg, phase = roll_in_time((ecg, phase), rng)                # [B, T, C] and [B, T, 2]
    (ecg,) = roll_in_time((ecg,), rng, axis=-1)                 # [B, leads, T]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def roll_in_time(arrays: tuple[jax.Array, ...], rng: jax.Array, axis: int = 1
                 ) -> tuple[jax.Array, ...]:
    """Rotates row b of every [B, ...] array in `arrays` by one random offset along `axis` (time;
    the arrays share B and that length), so an ECG and what is aligned with it (its beat phase)
    stay aligned. Rate, rhythm, axis and voltage are unchanged by a rotation."""
    def length(a):
        return a.shape[axis]
    if any(a.shape[0] != arrays[0].shape[0] or length(a) != length(arrays[0]) for a in arrays):
        raise ValueError(f"roll_in_time: arrays must share B and their length along axis {axis}, "
                         f"got {[tuple(a.shape) for a in arrays]}")
    shifts = jax.random.randint(rng, (arrays[0].shape[0],), 0, length(arrays[0]))
    row_axis = axis - 1 if axis > 0 else axis      # the axis inside one row of the batch
    roll = jax.vmap(lambda x, shift: jnp.roll(x, shift, axis=row_axis))
    return tuple(roll(a, shifts) for a in arrays)
