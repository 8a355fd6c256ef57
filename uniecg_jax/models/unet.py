"""Conditional 1-D UNet over the VAE latent (DiffuSETS `ECGconditional`), in flax.linen.

Latents are channels-last `[B, L, C]` (DiffuSETS: `[B, C, L]`, transposed by the importer). The
architecture follows DiffuSETS exactly at its released config (7 levels, kernel 7, 4 latent
channels), so imported weights reproduce the reference outputs:

* channel plan: level i of the encoder path maps `n * 2**i -> n * 2**(i+1)`; the decoder path mirrors
  it with skip concatenation (`unet_channel_plan`);
* every block: per-block timestep embedding (fixed sinusoidal table -> Linear -> Mish -> Linear, added
  to the input), conv(k) -> GroupNorm(1) -> Mish -> conv(1), self-attention, cross-attention on the
  condition, LayerNorm, conv(k) -> GroupNorm(1) -> Mish, residual (1x1 conv when widths differ);
* the condition is `[text embedding, sex, age, heart rate]` `[B, D + 3]`; each cross-attention maps it
  with Linear + LayerNorm to its keys/values. For classifier-free guidance a learned
  `null_condition` replaces it where `drop_condition` is set (DiffuSETS has no guidance).

Options beyond DiffuSETS (off at its config): `base_channels` (a wide input conv) and
`rhythm_condition`, the beat phase (`diffusion.rhythm`) as input channels and a per-block input,
zeroed with the dropped condition.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.layers.activations import constrain, mish
from uniecg_jax.layers.attention import MultiHeadAttention
from uniecg_jax.layers.conv import Conv1d, ConvTranspose1d
from uniecg_jax.layers.linear import DenseGeneral, Linear
from uniecg_jax.layers.norms import GroupNorm, LayerNorm
from uniecg_jax.layers.params import abstract_module_params
from uniecg_jax.models.schema import ConfigSchema, derived_field, dtype_field

NUM_SCALAR_CONDITIONS = 3  # sex (M=1, F=0), age in years, heart rate in bpm
RHYTHM_CHANNELS = 2        # the beat phase as (sin, cos): `diffusion.rhythm.rhythm_features`


# Every parameterised layer's output inside the UNet is pinned to batch-only sharding ([B, ...] over
# (data, fsdp), channels replicated; see `_batch_sharded_layer_outputs`).
_PINNED_LAYERS = (DenseGeneral, Conv1d, ConvTranspose1d, GroupNorm, LayerNorm)
_ACTIVATION_NAMES = {2: ("activation_batch", "activation_embed"),
                     3: ("activation_batch", "activation_length", "activation_embed"),
                     4: ("activation_batch", "activation_length", None, None)}


def _batch_sharded_layer_outputs(next_fun, args, kwargs, context):
    """Flax method interceptor: constrains the output of every layer in `_PINNED_LAYERS` to
    batch-only sharding (a no-op outside a rules context).

    Why: left to propagation, XLA's SPMD partitioner (jax 0.10.2, GSPMD and Shardy alike) gives
    activations between two of the UNet's layers a layout with channels over `tensor` and the
    batch over (data, fsdp), and on a mesh where data, fsdp and tensor are all > 1 it partitions
    some of those dots wrongly: it permutes the batch shards to (fsdp, data) order with a
    collective-permute and never permutes them back, so samples meet each other's condition (the
    UNet loss moved by 0.3-5% on a 2x2x2 mesh; tests/test_sharding.py has a 3-line pure-JAX
    reproduction). With every layer output batch-sharded, each dot only gathers its kernel over
    fsdp (FSDP) and reduces over tensor, paths that partition correctly. The UNet is small, so
    the replicated channels cost little.
    """
    out = next_fun(*args, **kwargs)
    if (context.method_name == "__call__" and isinstance(context.module, _PINNED_LAYERS)
            and getattr(out, "ndim", 0) in _ACTIVATION_NAMES):
        return constrain(out, _ACTIVATION_NAMES[out.ndim])
    return out


@dataclasses.dataclass(frozen=True)
class UNetConfig(ConfigSchema):
    """Shape of the conditional UNet (the schema of `config.model.unet`)."""
    config_group = "model.unet"
    latent_channels: int = 4
    latent_length: int = 128
    num_levels: int = 7
    kernel_size: int = 7
    num_heads: int = 8
    bottleneck_kernel_size: int = 3
    bottleneck_heads: int = 4
    bottleneck_hidden: int = 32
    text_embed_dim: int = 384
    num_train_steps: int = derived_field(1000, "diffusion.num_steps")  # rows of the timestep table
    time_embed_dim: int = 64
    time_hidden_dim: int = 128
    # 0 = DiffuSETS (the first block reads the latent channels directly); > 0 adds a kernel-3 input
    # conv from the latent to this width, so small latents still get a wide network.
    base_channels: int = 0
    # Multiplies (sex, age, heart rate) before the condition's Linear. DiffuSETS feeds raw values
    # (1, 1, 1); beside a unit-norm text embedding, raw ages/rates of ~50-150 swamp the Linear +
    # LayerNorm at init, so models trained here use ~(1, 0.01, 0.01).
    scalar_condition_scale: tuple[float, ...] = (1.0, 1.0, 1.0)
    # True adds the beat phase (`diffusion.rhythm`: sin, cos) as 2 input channels beside the latent,
    # read by the input conv (needs base_channels > 0), and projected into every block at that
    # block's resolution, beside the timestep embedding. False = DiffuSETS.
    rhythm_condition: bool = False
    dtype: Any = dtype_field(jnp.float32)
    param_dtype: Any = dtype_field(jnp.float32)

    @classmethod
    def from_config(cls, unet_cfg: Any = None, num_train_steps: int | None = None,
                    group: str | None = None) -> "UNetConfig":
        """`ConfigSchema.from_config` of `config.model.unet`, with `num_train_steps` from
        `config.diffusion.num_steps` (the default 1000 when not given)."""
        derived = {} if num_train_steps is None else {"num_train_steps": int(num_train_steps)}
        return super().from_config(unet_cfg, group, **derived)

    def __post_init__(self):
        if len(self.scalar_condition_scale) != NUM_SCALAR_CONDITIONS:
            raise ValueError("model.unet.scalar_condition_scale needs 3 values (sex, age, heart "
                             f"rate), got {self.scalar_condition_scale}")
        if self.rhythm_condition and not self.base_channels:
            raise ValueError("model.unet.rhythm_condition needs model.unet.base_channels > 0 (the "
                             "input conv reads the rhythm channels)")

    @property
    def condition_dim(self) -> int:
        return self.text_embed_dim + NUM_SCALAR_CONDITIONS

    @property
    def first_block_channels(self) -> int:
        return self.base_channels or self.latent_channels


def unet_channel_plan(num_levels: int, base_channels: int) -> tuple[list[int], list[int]]:
    """Input and output widths of the 2 * (num_levels - 1) blocks (down blocks, then up blocks).

    DiffuSETS's construction: widths double on the way down and halve on the way up; each up block
    after the first also receives the skip connection of the matching down block.
    """
    if num_levels < 3:
        raise ValueError(f"unet num_levels must be >= 3, got {num_levels}")
    down_in = [base_channels * 2 ** i for i in range(num_levels - 1)]
    down_out = [2 * c for c in down_in]
    up_in = [2 * down_in[num_levels - 2 - i] for i in range(num_levels - 1)]
    up_out = [down_out[num_levels - 2 - i] // 2 for i in range(num_levels - 1)]
    for i in range(num_levels - 2):
        up_in[num_levels - 2 - i] += down_out[i]  # skip connection of down block i
    return down_in + up_in, down_out + up_out


def timestep_table(num_steps: int, dim: int) -> np.ndarray:
    """DiffuSETS's fixed sinusoidal table `[num_steps, dim]` for t = 1..num_steps (float32).

    Frequencies `exp(-10 * j / (dim/2 - 1))` (base e^10, not 10000) and `[sin, cos]` halves.
    """
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-10.0 / (half - 1)))
    angles = (np.arange(num_steps, dtype=np.float32) + 1)[:, None] * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


class TimeEmbedding(nn.Module):
    """Timesteps `[B]` -> per-channel offsets `[B, channels]` (table -> Linear -> Mish -> Linear)."""
    cfg: UNetConfig
    channels: int

    @nn.compact
    def __call__(self, timesteps: jax.Array) -> jax.Array:
        table = jnp.asarray(timestep_table(self.cfg.num_train_steps, self.cfg.time_embed_dim))
        hidden = Linear(self.cfg.time_hidden_dim, dtype=self.cfg.dtype,
                        param_dtype=self.cfg.param_dtype, name="fc1")(table[timesteps])
        return Linear(self.channels, kernel_axes=("mlp", "embed"), dtype=self.cfg.dtype,
                      param_dtype=self.cfg.param_dtype, name="fc2")(mish(hidden))


class SelfAttention(nn.Module):
    """Pre-LayerNorm self-attention with projections to `hidden` and back, residual. `[B, L, C]`."""
    cfg: UNetConfig
    hidden: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)
        normed = LayerNorm(name="norm", **kw)(x)
        q, k, v = (Linear(self.hidden, name=f"to_{n}", **kw)(normed) for n in "qkv")
        attended = MultiHeadAttention(self.num_heads, name="attention", **kw)(q, k, v)
        return Linear(x.shape[-1], kernel_axes=("mlp", "embed"), name="to_out", **kw)(attended) + x


class CrossAttention(nn.Module):
    """Queries from `x` `[B, L, C]`, keys/values from the condition `[B, D + 3]`; residual.

    The condition goes through Linear + LayerNorm to width C (one key/value token). DiffuSETS
    repeats that token L times; attending over L identical keys equals attending over one.
    """
    cfg: UNetConfig
    hidden: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array) -> jax.Array:
        kw = dict(dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)
        channels = x.shape[-1]
        q = Linear(self.hidden, name="to_q", **kw)(LayerNorm(name="norm", **kw)(x))
        cond = Linear(channels, name="value_combiner", **kw)(condition[:, None, :])
        cond = LayerNorm(name="condition_norm", **kw)(cond)
        k = Linear(self.hidden, name="to_k", **kw)(cond)
        v = Linear(self.hidden, name="to_v", **kw)(cond)
        attended = MultiHeadAttention(self.num_heads, name="attention", **kw)(q, k, v)
        return Linear(channels, kernel_axes=("mlp", "embed"), name="to_out", **kw)(attended) + x


class Block(nn.Module):
    """One UNet block `[B, L, C_in] -> [B, L, C_out]` (see module docstring)."""
    cfg: UNetConfig
    out_channels: int
    hidden: int

    @nn.compact
    def __call__(self, x, timesteps, condition, rhythm=None):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        in_channels = x.shape[-1]
        mid = (in_channels + self.out_channels) // 2
        h = x + TimeEmbedding(cfg, in_channels, name="time_emb")(timesteps)[:, None, :]
        if rhythm is not None:  # beat phase at this resolution, projected per position
            h = h + Linear(in_channels, kernel_axes=(None, "mlp"), name="rhythm_proj", **kw)(rhythm)
        h = Conv1d(mid, cfg.kernel_size, name="pre_shortcut_conv", **kw)(h)
        h = mish(GroupNorm(1, name="norm1", **kw)(h))
        h = Conv1d(mid, 1, name="shortcut_conv", **kw)(h)
        h = SelfAttention(cfg, self.hidden, cfg.num_heads, name="self_attention")(h)
        h = CrossAttention(cfg, self.hidden, cfg.num_heads, name="cross_attention")(h, condition)
        h = LayerNorm(name="attention_norm", **kw)(h)
        h = Conv1d(self.out_channels, cfg.kernel_size, name="post_shortcut_conv", **kw)(h)
        h = mish(GroupNorm(1, name="norm2", **kw)(h))
        residual = x if in_channels == self.out_channels else Conv1d(
            self.out_channels, 1, name="res_conv", **kw)(x)
        return constrain(h + residual.astype(h.dtype))


class Bottleneck(nn.Module):
    """Width-preserving middle block at the coarsest resolution (kernel 3 in DiffuSETS)."""
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x, timesteps, condition, rhythm=None):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        channels = x.shape[-1]
        conv = lambda name: Conv1d(channels, cfg.bottleneck_kernel_size, name=name, **kw)  # noqa
        h = x + TimeEmbedding(cfg, channels, name="time_emb")(timesteps)[:, None, :]
        if rhythm is not None:  # (the 2-wide input axis is never sharded)
            h = h + Linear(channels, kernel_axes=(None, "mlp"), name="rhythm_proj", **kw)(rhythm)
        h = conv("conv1")(h)
        h = conv("conv1_2")(mish(GroupNorm(1, name="norm1", **kw)(h)))
        h = SelfAttention(cfg, cfg.bottleneck_hidden, cfg.bottleneck_heads,
                          name="self_attention")(h)
        h = CrossAttention(cfg, cfg.bottleneck_hidden, cfg.bottleneck_heads,
                           name="cross_attention")(h, condition)
        h = conv("conv2")(LayerNorm(name="attention_norm", **kw)(h))
        h = mish(GroupNorm(1, name="norm2", **kw)(h))
        return constrain(x + h)


class ConditionalUNet(nn.Module):
    """Predicts the noise (or v) of a noisy latent.

    Args (call):
      latent: `[B, L, C]` noisy latent (L divisible by 2**(num_levels-1)).
      timesteps: `[B]` int diffusion steps in [0, num_train_steps).
      condition: `[B, D + 3]` = text embedding ++ (sex, age, heart rate).
      drop_condition: optional `[B]` bool; True replaces the condition by the learned null condition
        (classifier-free guidance), and the rhythm by zeros.
      rhythm: `[B, L, 2]` beat-phase features (`diffusion.rhythm`) when `rhythm_condition`; None or
        zeros = rhythm unknown.
    Returns `[B, L, C]`.
    """
    cfg: UNetConfig

    def __call__(self, latent, timesteps, condition, drop_condition=None, rhythm=None):
        with nn.intercept_methods(_batch_sharded_layer_outputs):
            return self._forward(latent, timesteps, condition, drop_condition, rhythm)

    @nn.compact
    def _forward(self, latent, timesteps, condition, drop_condition, rhythm):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if condition.shape[-1] != cfg.condition_dim:
            raise ValueError(f"unet condition: expected width {cfg.condition_dim} "
                             f"(text {cfg.text_embed_dim} + 3), got {condition.shape}")
        down_steps = 2 ** (cfg.num_levels - 1)
        if latent.shape[1] % down_steps:
            raise ValueError(f"unet latent length {latent.shape[1]} is not divisible by "
                             f"{down_steps} (2**(num_levels-1))")
        null_condition = self.param("null_condition", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("embed",)), (cfg.condition_dim,), cfg.param_dtype)
        scale = jnp.concatenate([jnp.ones((cfg.text_embed_dim,), jnp.float32),
                                 jnp.asarray(cfg.scalar_condition_scale, jnp.float32)])
        condition = (condition.astype(jnp.float32) * scale).astype(cfg.dtype)
        if drop_condition is not None:
            condition = jnp.where(drop_condition[:, None], null_condition.astype(cfg.dtype)[None],
                                  condition)
        timesteps = timesteps.astype(jnp.int32)
        in_channels, out_channels = unet_channel_plan(cfg.num_levels, cfg.first_block_channels)
        hidden = [2 * c for c in in_channels]
        n_down = cfg.num_levels - 1

        x = constrain(latent.astype(cfg.dtype))
        # rhythm_at[i]: the beat phase averaged to level i's length (None without rhythm).
        rhythm_at = [None] * cfg.num_levels
        if cfg.rhythm_condition:
            rhythm = self._rhythm_channels(rhythm, latent.shape, drop_condition)
            x = jnp.concatenate([x, rhythm], axis=-1)
            rhythm_at = [rhythm.reshape(rhythm.shape[0], -1, 2 ** i, rhythm.shape[-1]).mean(2)
                         for i in range(cfg.num_levels)]
        if cfg.base_channels:
            x = Conv1d(cfg.base_channels, 3, name="input_proj", **kw)(x)
        skips = []
        for i in range(n_down):
            h = Block(cfg, out_channels[i], hidden[i], name=f"down_{i}")(x, timesteps, condition,
                                                                        rhythm_at[i])
            skips.append(h)
            x = Conv1d(out_channels[i], 3, stride=2, padding=(1, 1), name=f"downsample_{i}",
                       **kw)(h)
        skips.pop()  # the coarsest block's output feeds the bottleneck only through downsampling
        x = Bottleneck(cfg, name="bottleneck")(x, timesteps, condition, rhythm_at[n_down])
        for j in range(n_down):
            i = n_down + j
            x = ConvTranspose1d(x.shape[-1], 4, 2, 1, name=f"upsample_{j}", **kw)(x)
            if j > 0:
                x = jnp.concatenate([x, skips[-j].astype(x.dtype)], axis=-1)
            x = Block(cfg, out_channels[i], hidden[i], name=f"up_{j}")(
                x, timesteps, condition, rhythm_at[n_down - 1 - j])
        x = mish(Conv1d(cfg.latent_channels, 3, name="output_conv", **kw)(x))
        x = Conv1d(cfg.latent_channels, 1, name="output_proj", **kw)(x)
        return x.astype(jnp.float32)

    def _rhythm_channels(self, rhythm, latent_shape, drop_condition) -> jax.Array:
        """`[B, L, 2]` in the compute dtype: `rhythm`, zeros where unknown or dropped."""
        shape = (*latent_shape[:2], RHYTHM_CHANNELS)
        if rhythm is None:
            return jnp.zeros(shape, self.cfg.dtype)
        if tuple(rhythm.shape) != shape:
            raise ValueError(f"unet rhythm: expected {shape} (batch, latent length, sin/cos), got "
                             f"{tuple(rhythm.shape)}")
        if drop_condition is not None:
            rhythm = jnp.where(drop_condition[:, None, None], 0.0, rhythm)
        return rhythm.astype(self.cfg.dtype)


@functools.lru_cache(maxsize=8)
def abstract_unet_params(cfg: UNetConfig) -> Any:
    """ShapeDtypeStruct tree of the UNet's `params` (no allocation)."""
    batch = 1
    return abstract_module_params(
        ConditionalUNet(cfg), jnp.zeros((batch, cfg.latent_length, cfg.latent_channels)),
        jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, cfg.condition_dim)))
