"""1-D building blocks of the diffusion VAE and UNet, channels-last (`[B, L, C]`).

Every layer follows the PyTorch layer it replaces in DiffuSETS numerically (padding, eps, head split),
so imported weights give the same outputs. Kernels carry logical axis names (`conv_window`, `conv_in`,
`conv_out`; `embed`/`mlp` for projections; `norm`) and run in the compute `dtype` with float32
accumulation: on CPU a bf16 x bf16 dot is ~6x slower without `preferred_element_type=float32`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.layers.linear import DenseGeneral, to_dtype

DType = Any

# torch.nn.Linear: kernel stored `[in, out]`, bias on; f32 accumulation comes from `DenseGeneral`.
Dense = functools.partial(DenseGeneral, kernel_axes=("embed", "mlp"), use_bias=True,
                          kernel_init=nn.initializers.lecun_normal())
as_dtype = to_dtype


def mish(x: jax.Array) -> jax.Array:
    """Mish activation `x * tanh(softplus(x))` (torch.nn.functional.mish)."""
    return x * jnp.tanh(jax.nn.softplus(x))


def _accumulate(x: jax.Array, dtype: DType):
    # bf16 inputs accumulate in f32 (fast on CPU and exact enough); f32 stays f32.
    return jnp.float32 if jnp.dtype(dtype) != jnp.float32 else None


def _conv_params(module: nn.Module, kernel_size: int, in_channels: int, out_channels: int):
    """Kernel `[width, C_in, C_out]` and bias `[C_out]` with the conv logical axis names."""
    kernel = module.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_window", "conv_in", "conv_out")),
        (kernel_size, in_channels, out_channels), module.param_dtype)
    bias = module.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("conv_out",)), (out_channels,), module.param_dtype)
    return kernel, bias


def _conv(x, kernel, stride, padding, lhs_dilation, dtype):
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride,), padding=(tuple(padding),),
        lhs_dilation=(lhs_dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
        preferred_element_type=_accumulate(x, dtype))
    return y.astype(dtype)


class Conv1d(nn.Module):
    """1-D convolution `[B, L, C_in] -> [B, L', features]`; kernel `[width, C_in, C_out]`.

    `padding` is `(left, right)` zeros; `None` means "same" for odd widths at stride 1 (torch
    `padding="same"` / `padding=(k-1)//2`).
    """
    features: int
    kernel_size: int
    stride: int = 1
    padding: tuple[int, int] | None = None
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
        padding = self.padding
        if padding is None:
            padding = ((self.kernel_size - 1) // 2, self.kernel_size // 2)
        return _conv(x, kernel, self.stride, padding, 1, self.dtype) + bias.astype(self.dtype)


class ConvTranspose1d(nn.Module):
    """Transposed 1-D convolution (torch.nn.ConvTranspose1d semantics, output `(L-1)*s - 2p + k`).

    The kernel is stored `[width, C_in, C_out]` = torch's `[C_in, C_out, width]` transposed; it is
    applied as a stride-dilated input convolved with the spatially flipped kernel.
    """
    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features)
        edge = self.kernel_size - 1 - self.padding
        y = _conv(x, kernel[::-1], 1, (edge, edge), self.stride, self.dtype)
        return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over `[B, L, C]` (statistics per sample and group, in float32)."""
    num_groups: int
    epsilon: float = 1e-5
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into "
                             f"{self.num_groups} groups")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("norm",)), (channels,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("norm",)), (channels,),
                          self.param_dtype)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, -1)
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis (float32 statistics, eps 1e-5)."""
    epsilon: float = 1e-5
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("norm",)), (features,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("norm",)), (features,),
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, num_heads: int,
                          dtype: DType) -> jax.Array:
    """Softmax attention. query `[B, Lq, D]`, key/value `[B, Lk, D]` -> `[B, Lq, D]`.

    Heads split the last axis into `[num_heads, D // num_heads]` (torch.nn.MultiheadAttention).
    """
    batch, q_len, width = query.shape
    if width % num_heads:
        raise ValueError(f"attention width {width} is not divisible by {num_heads} heads")
    head_dim = width // num_heads
    q = query.reshape(batch, q_len, num_heads, head_dim).astype(dtype)
    k = key.reshape(batch, key.shape[1], num_heads, head_dim).astype(dtype)
    v = value.reshape(batch, value.shape[1], num_heads, head_dim).astype(dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / np.sqrt(head_dim), axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=_accumulate(v, dtype))
    return out.reshape(batch, q_len, width).astype(dtype)


class MultiHeadAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first): q/k/v in-projections, attention, out-projection.

    query `[B, Lq, D]`, key/value `[B, Lk, D]` -> `[B, Lq, D]`.
    """
    num_heads: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
        width = query.shape[-1]
        dense = lambda name, axes=("embed", "mlp"): Dense(  # noqa: E731
            width, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        attended = dot_product_attention(dense("q_proj")(query), dense("k_proj")(key),
                                         dense("v_proj")(value), self.num_heads, self.dtype)
        return dense("out_proj", ("mlp", "embed"))(attended)


def constrain(x: jax.Array, names: Sequence[str | None] = (
        "activation_batch", "activation_length", "activation_embed")) -> jax.Array:
    """Logical sharding constraint on a `[B, L, C]` activation (no-op outside a rules context)."""
    return nn.with_logical_constraint(x, tuple(names))


def init_params_on_host(model: nn.Module, seed: int, *init_args: Any, **init_kwargs: Any) -> Any:
    """Parameters for `model` drawn with NumPy on the host, without compiling `model.init`.

    Same distributions as the layer initialisers (kernels: normal with variance 1/fan_in, fan_in =
    every axis but the last; biases and `null_condition`: 0; norm scales: 1). XLA:CPU needs minutes
    to compile `jit(model.init)` of the 7-level UNet (one threefry kernel per tensor), while this
    takes milliseconds; use `sharding.sharded_init` on accelerators, where that compile is cheap.
    Returns the plain (unboxed) `{"params": ...}` tree.
    """
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *init_args, **init_kwargs)
    abstract = nn.meta.unbox(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            values = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        elif name == "scale":
            values = np.ones(leaf.shape)
        else:
            values = np.zeros(leaf.shape)
        return jnp.asarray(values, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)
