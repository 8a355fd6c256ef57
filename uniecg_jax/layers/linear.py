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

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DType = Any


def to_dtype(name_or_dtype: str | DType) -> jnp.dtype:
    """'bfloat16' / 'float32' / a dtype -> a jnp dtype."""
    return jnp.dtype(name_or_dtype)


@jax.custom_vjp
def _matmul_2d(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [K, N] -> [M, N] float32, inputs in their own (compute) dtype."""
    return lax.dot(a, b, preferred_element_type=jnp.float32)


def _matmul_2d_fwd(a, b):
    return _matmul_2d(a, b), (a, b)


def _row_major_transpose(x: jax.Array) -> jax.Array:
    """x [M, K] -> x.T [K, M] materialised row-major.

    XLA folds a plain transpose into the consuming dot's dimension numbers (or into a layout), and
    XLA:CPU's fast bf16 matmul kernel (YNNPACK) only takes a left operand contracted over its last
    dim: the weight gradient `a^T . g` otherwise falls back to an f32 upcast at ~0.4x the speed.
    The barrier on the flattened copy forces a real row-major transpose (a cheap memory pass).
    """
    flat = lax.optimization_barrier(x.T.reshape(-1))
    return flat.reshape(x.shape[1], x.shape[0])


def _weight_grad(a: jax.Array, grad: jax.Array) -> jax.Array:
    """a [M, K], grad [M, N] -> a^T . grad [K, N] in f32."""
    if a.dtype != jnp.bfloat16 or jax.default_backend() != "cpu":
        return lax.dot_general(a, grad, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
    return lax.dot(_row_major_transpose(a), grad, preferred_element_type=jnp.float32)


def _matmul_2d_bwd(residuals, grad):
    # JAX's own transpose of a dot with preferred_element_type=f32 feeds the f32 cotangent into
    # f32 x bf16 dots, which XLA:CPU runs at f32 speed (2/3 of training FLOPs). Casting the
    # cotangent to the compute dtype keeps the backward matmuls on the fast bf16 -> f32 path
    # (a no-op for f32 compute).
    a, b = residuals
    grad = grad.astype(a.dtype)
    grad_a = lax.dot_general(grad, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    grad_b = _weight_grad(a, grad)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(x: jax.Array, kernel: jax.Array, contract_x: Sequence[int], contract_kernel: Sequence[int],
           dtype: DType, out_dtype: DType | None = None) -> jax.Array:
    """`x . kernel` over the given dims, inputs cast to `dtype`, accumulated in f32 (forward and
    backward), result in `out_dtype` (default `dtype`). Output dims: x's free dims, then kernel's
    free dims."""
    contract_x = tuple(a % x.ndim for a in contract_x)
    contract_kernel = tuple(a % kernel.ndim for a in contract_kernel)
    x_free = tuple(a for a in range(x.ndim) if a not in contract_x)
    kernel_free = tuple(a for a in range(kernel.ndim) if a not in contract_kernel)
    x_shape = tuple(x.shape[a] for a in x_free)
    kernel_shape = tuple(kernel.shape[a] for a in kernel_free)
    depth = math.prod(x.shape[a] for a in contract_x)
    # As one 2-D matmul (a free reshape when the contracted dims are trailing/leading, as in
    # DenseGeneral), so the custom backward above covers every layout.
    x2 = x.astype(dtype).transpose(x_free + contract_x).reshape(math.prod(x_shape), depth)
    kernel2 = kernel.astype(dtype).transpose(contract_kernel + kernel_free).reshape(
        depth, math.prod(kernel_shape))
    y = _matmul_2d(x2, kernel2).reshape(x_shape + kernel_shape)
    return y.astype(out_dtype or dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
    return _einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, grad):
    # Same reason as _matmul_2d_bwd: keep the backward contractions bf16 x bf16 -> f32.
    a, b = residuals
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    grad = grad.astype(a.dtype)
    grad_a = jnp.einsum(f"{out},{spec_b}->{spec_a}", grad, b, preferred_element_type=jnp.float32)
    grad_b = jnp.einsum(f"{out},{spec_a}->{spec_b}", grad, a, preferred_element_type=jnp.float32)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: DType,
           out_dtype: DType | None = None) -> jax.Array:
    """Two-operand `jnp.einsum(spec, a, b)` with inputs in `dtype`, f32 accumulation forward and
    backward, result in `out_dtype` (default `dtype`). Every index of an operand must appear in the
    other operand or the output (true for matmuls and attention contractions)."""
    inputs, out = spec.replace(" ", "").split("->")
    spec_a, spec_b = inputs.split(",")
    for name, own, other in (("first", spec_a, spec_b), ("second", spec_b, spec_a)):
        if any(i not in other and i not in out for i in own):
            raise ValueError(f"einsum {spec!r}: an index of the {name} operand is summed "
                             "over that operand alone; reduce it first")
    y = _einsum_f32(f"{spec_a},{spec_b}->{out}", a.astype(dtype), b.astype(dtype))
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
        y = self.contract(x, kernel)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init,
                                                     tuple(self.kernel_axes[len(axis):])),
                features, self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y

    def contract(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """x [..., *in_dims] . kernel [*in_dims, *features] -> [..., *features] in the output dtype,
        without the bias.

        A method of its own so that a caller can swap the matmul implementation from outside
        (`flax.linen.intercept_methods`) without this layer knowing: decoding on CPU injects
        `kernels.small_batch_matmul` here (`small_batch_matmul.packed_kernels_injected`).
        """
        num_contracted = kernel.ndim - (1 if isinstance(self.features, int) else len(self.features))
        return matmul(x, kernel, tuple(range(x.ndim - num_contracted, x.ndim)),
                      tuple(range(num_contracted)), self.dtype, self.out_dtype or self.dtype)


# torch.nn.Linear: kernel stored `[in, out]` (lecun-normal init), bias on; logical names
# ("embed", "mlp") unless the caller names them.
Linear = functools.partial(DenseGeneral, kernel_axes=("embed", "mlp"), use_bias=True,
                           kernel_init=nn.initializers.lecun_normal())
