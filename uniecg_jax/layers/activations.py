"""Activation functions beyond `jax.nn`, and the logical sharding constraint on `[B, L, C]`
activations of the convolutional models (UNet, VAE, ECG-CLIP)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

SEQUENCE_AXES = ("activation_batch", "activation_length", "activation_embed")


def mish(x: jax.Array) -> jax.Array:
    """Mish activation `x * tanh(softplus(x))` (torch.nn.functional.mish)."""
    return x * jnp.tanh(jax.nn.softplus(x))


def constrain(x: jax.Array, names: Sequence[str | None] = SEQUENCE_AXES) -> jax.Array:
    """Logical sharding constraint on a `[B, L, C]` activation (no-op outside a rules context)."""
    return nn.with_logical_constraint(x, tuple(names))
