"""Activation functions beyond `jax.nn` (Mish, CLIP's quick GELU), and the logical sharding
constraint on `[B, L, C]` activations of the convolutional models (UNet, VAE, ECG-CLIP)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

SEQUENCE_AXES = ("activation_batch", "activation_length", "activation_embed")


def mish(x: jax.Array) -> jax.Array:
    """Mish activation `x * tanh(softplus(x))` (torch.nn.functional.mish)."""
    return x * jnp.tanh(jax.nn.softplus(x))


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation `x * sigmoid(1.702 x)` (transformers' "quick_gelu")."""
    return x * jax.nn.sigmoid(1.702 * x)


def constrain(x: jax.Array, names: Sequence[str | None] = SEQUENCE_AXES) -> jax.Array:
    """Logical sharding constraint on a `[B, L, C]` activation (no-op outside a rules context)."""
    return nn.with_logical_constraint(x, tuple(names))
