"""Dense layers with a separate parameter dtype and compute dtype, accumulating in float32.

Why not `flax.linen.Dense`: on CPU (and for numerics everywhere) a bf16 x bf16 matmul must accumulate
in f32. `lax.dot_general(..., preferred_element_type=jnp.float32)` does that and on this CPU runs
~6x faster than plain bf16 dot. Every matmul in the project should go through `matmul` or
`DenseGeneral` below.

Usage (any model):

    proj = DenseGeneral(features=(num_heads, head_dim), kernel_axes=("embed", "q_heads", "head_dim"),
                        dtype=jnp.bfloat16, param_dtype=jnp.float32, name="query")
    q = proj(x)            # x [B, T, D] -> [B, T, H, Dh] in bfloat16

The kernel has shape `in_dims + features` where `in_dims` are the sizes of `x` at `axis`; its logical
axis names (`kernel_axes`, one per kernel dimension) feed the rules table in `uniecg_jax/sharding.py`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DType = Any


def to_dtype(name_or_dtype: str | DType) -> jnp.dtype:
    """'bfloat16' / 'float32' / a dtype -> a jnp dtype."""
    return jnp.dtype(name_or_dtype)


def matmul(x: jax.Array, kernel: jax.Array, contract_x: Sequence[int], contract_kernel: Sequence[int],
           dtype: DType, out_dtype: DType | None = None) -> jax.Array:
    """`x . kernel` over the given dims, inputs cast to `dtype`, accumulated in f32, result in
    `out_dtype` (default `dtype`). Output dims: x's free dims then kernel's free dims."""
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    contract = ((tuple(contract_x), tuple(contract_kernel)), ((), ()))
    y = lax.dot_general(x, kernel, contract, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or dtype)


def _normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in axes)


class DenseGeneral(nn.Module):
    """A linear map over one or more trailing input axes onto `features` output axes.

    Attributes:
      features: output dims, e.g. `(4096,)` or `(num_heads, head_dim)`.
      kernel_axes: logical names of the kernel dims (len(axis) + len(features) names).
      axis: input dims contracted (default: the last one). They must be the trailing dims of `x`.
      use_bias: adds a bias of shape `features` with logical names `kernel_axes[len(axis):]`.
      dtype: compute dtype (matmul inputs and the output); param_dtype: storage dtype of kernel/bias.
      out_dtype: output dtype if different from `dtype` (e.g. float32 logits).
    """
    features: int | Sequence[int]
    kernel_axes: Sequence[str | None]
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    out_dtype: DType | None = None
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *in_dims] -> [..., *features]."""
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = _normalize_axes(axis, x.ndim)
        if axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(f"DenseGeneral {self.name}: contracted axes {axis} must be the trailing "
                             f"dims of an input of rank {x.ndim}")
        if len(self.kernel_axes) != len(axis) + len(features):
            raise ValueError(f"DenseGeneral {self.name}: kernel_axes {self.kernel_axes} needs "
                             f"{len(axis) + len(features)} names")
        kernel_shape = tuple(x.shape[a] for a in axis) + features
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
            kernel_shape, self.param_dtype)
        y = matmul(x, kernel, axis, tuple(range(len(axis))), self.dtype,
                   self.out_dtype or self.dtype)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init,
                                                     tuple(self.kernel_axes[len(axis):])),
                features, self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y
