"""SwiGLU feed-forward block (Llama / Qwen2): down(silu(gate(x)) * up(x))."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.layers.linear import DenseGeneral


class SwiGLU(nn.Module):
    """x [B, T, D] -> [B, T, D] through an intermediate width `intermediate_size` (logical "mlp")."""
    intermediate_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = DenseGeneral(self.intermediate_size, ("embed", "mlp"), name="gate", **dense)(x)
        up = DenseGeneral(self.intermediate_size, ("embed", "mlp"), name="up", **dense)(x)
        hidden = nn.silu(gate) * up
        hidden = nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return DenseGeneral(x.shape[-1], ("mlp", "embed"), name="down", **dense)(hidden)
