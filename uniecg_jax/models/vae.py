"""1-D ECG VAE (DiffuSETS `VAE_Encoder` / `VAE_Decoder`) in flax.linen.

ECG `[B, L, 12]` (L = 1024 at 102.4 Hz) -> latent `[B, L/8, 4]` scaled by 0.18215 -> ECG. Encoder:
conv 12 -> w0; per width (128, 256, 512) `num_res_blocks` residual blocks then a stride-2 conv
(right-padded by one sample); `num_res_blocks` more blocks at the last width; a middle
(residual, self-attention, residual); GroupNorm + SiLU; conv to 2 x latent channels (mean, log
variance); a 1x1 conv. The decoder mirrors it with nearest-neighbour upsampling. Layers are listed
in a *plan* (`encoder_plan`, `decoder_plan`) shared with the DiffuSETS importer, whose PyTorch
`nn.Sequential` indices are the plan positions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.layers.activations import constrain
from uniecg_jax.layers.attention import bidirectional_attention, merge_heads, split_heads
from uniecg_jax.errors import ConfigError
from uniecg_jax.layers.conv import CONV_ALGORITHMS, Conv1d, UpsampledConv1d
from uniecg_jax.layers.linear import Linear
from uniecg_jax.layers.norms import GroupNorm
from uniecg_jax.layers.params import abstract_module_params
from uniecg_jax.models.schema import ConfigSchema, dtype_field


@dataclasses.dataclass(frozen=True)
class VAEConfig(ConfigSchema):
    """Shape of the VAE (the schema of `config.model.vae`)."""
    config_group = "model.vae"
    num_leads: int = 12
    widths: tuple[int, ...] = (128, 256, 512)
    num_res_blocks: int = 2
    latent_channels: int = 4
    num_groups: int = 32
    attention_heads: int = 1
    scaling_factor: float = 0.18215
    dtype: Any = dtype_field(jnp.float32)
    param_dtype: Any = dtype_field(jnp.float32)
    # Read by the diffusion trainer, not the module: True sets scaling_factor = 1 / std of the
    # trained VAE's latents after the VAE phase (unit-variance data for the DDPM schedule); False
    # keeps DiffuSETS's 0.18215 (imported weights).
    auto_scale: bool = False
    # How the stride-1 convs of width 2 and 3 run (`layers.conv`), same parameters either way:
    # "direct" (lax.conv; rounds as PyTorch does, so imported weights match DiffuSETS) or
    # "winograd" (F(6, 3) / F(6, 2): 2.25x / 1.7x fewer multiplies; decode 1.4x faster on CPU at
    # f32, max relative error ~2e-5 against float64). 1x1 and strided convs are always direct.
    conv_algorithm: str = "direct"

    def __post_init__(self):
        if self.conv_algorithm not in CONV_ALGORITHMS:
            raise ConfigError(f"model.vae.conv_algorithm={self.conv_algorithm!r}; choose from "
                              f"{', '.join(CONV_ALGORITHMS)}")

    @property
    def downsampling(self) -> int:
        return 2 ** len(self.widths)


class PlanStep(NamedTuple):
    """One layer of the encoder/decoder: kind in conv/res/attn/down/up/norm/silu; widths."""
    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: int = 3


def encoder_plan(cfg: VAEConfig) -> list[PlanStep]:
    """Encoder layers in order (position i = DiffuSETS `encoder.{i}`)."""
    plan = [PlanStep("stem", "conv", cfg.num_leads, cfg.widths[0])]
    width = cfg.widths[0]
    for level, target in enumerate(cfg.widths):
        for b in range(cfg.num_res_blocks):
            plan.append(PlanStep(f"level{level}_res{b}", "res", width, target))
            width = target
        plan.append(PlanStep(f"level{level}_down", "down", width, width))
    for b in range(cfg.num_res_blocks):
        plan.append(PlanStep(f"bottom_res{b}", "res", width, width))
    plan += [PlanStep("mid_res0", "res", width, width), PlanStep("mid_attn", "attn", width, width),
             PlanStep("mid_res1", "res", width, width), PlanStep("out_norm", "norm", width, width),
             PlanStep("out_silu", "silu", width, width),
             PlanStep("moments_conv", "conv", width, 2 * cfg.latent_channels),
             PlanStep("moments_proj", "conv", 2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)]
    return plan


def decoder_plan(cfg: VAEConfig) -> list[PlanStep]:
    """Decoder layers in order (position i = DiffuSETS `decoder.{i}`)."""
    width = cfg.widths[-1]
    plan = [PlanStep("latent_proj", "conv", cfg.latent_channels, cfg.latent_channels, 1),
            PlanStep("stem", "conv", cfg.latent_channels, width),
            PlanStep("mid_res0", "res", width, width), PlanStep("mid_attn", "attn", width, width),
            PlanStep("mid_res1", "res", width, width)]
    level_widths = [cfg.widths[-1]] + list(reversed(cfg.widths))
    for level, target in enumerate(level_widths):
        for b in range(cfg.num_res_blocks + 1):
            plan.append(PlanStep(f"level{level}_res{b}", "res", width, target))
            width = target
        if level < len(level_widths) - 1:
            plan.append(PlanStep(f"level{level}_up", "up", width, width))
            plan.append(PlanStep(f"level{level}_up_conv", "conv", width, width))
    plan += [PlanStep("out_norm", "norm", width, width), PlanStep("out_silu", "silu", width, width),
             PlanStep("out_conv", "conv", width, cfg.num_leads)]
    return plan


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3 -> GroupNorm -> SiLU -> conv3, plus (1x1-projected) input.

    `__call__(x, moments) -> (y, y's moments or None)`. With `native_winograd` each conv runs the
    fused kernel with its norm (folded into per-sample channel scales and shifts) and SiLU applied
    as it reads its input, the residual added as it writes, and its output's `channel_moments`
    summed on the way, which the next norm takes instead of reading the tensor again: x's from
    the layer before (`moments`, None: computed here), y's for the layer after.
    """
    cfg: VAEConfig
    out_channels: int
    native_winograd: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, moments: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        kw = dict(dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)
        conv_kw = dict(kw, algorithm=self.cfg.conv_algorithm, native=self.native_winograd)
        norms = [GroupNorm(self.cfg.num_groups, name=f"norm{i}", **kw) for i in (1, 2)]
        convs = [Conv1d(self.out_channels, 3, name=f"conv{i}", **conv_kw) for i in (1, 2)]
        residual = x
        if x.shape[-1] != self.out_channels:
            residual = Conv1d(self.out_channels, 1, name="skip", **conv_kw)(x)
        if not self.native_winograd:
            h = convs[0](nn.silu(norms[0](x)))
            return constrain(convs[1](nn.silu(norms[1](h))) + residual), None
        h, moments = convs[0](x, input_affine=norms[0](x, as_affine=True, moments=moments),
                              with_moments=True)
        y, moments = convs[1](h, input_affine=norms[1](h, as_affine=True, moments=moments),
                              residual=residual, with_moments=True)
        return constrain(y), moments


class AttentionBlock(nn.Module):
    """Self-attention over time with a fused q/k/v projection, residual. `[B, L, C]`.

    DiffuSETS defines a GroupNorm here but never applies it; so neither do we.
    """
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)
        width = x.shape[-1]
        heads = [split_heads(part, self.cfg.attention_heads)
                 for part in jnp.split(Linear(3 * width, name="qkv_proj", **kw)(x), 3, axis=-1)]
        attended = merge_heads(bidirectional_attention(*heads, self.cfg.dtype))
        out = Linear(width, kernel_axes=("mlp", "embed"), name="out_proj", **kw)(attended)
        return constrain(out + x)


def _run_plan(module: nn.Module, plan: list[PlanStep], x: jax.Array) -> jax.Array:
    cfg = module.cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    conv_kw = dict(kw, algorithm=cfg.conv_algorithm, native=module.native_winograd)
    moments = None   # x's `channel_moments` where the fused kernel summed them as it wrote x
    for index, step in enumerate(plan):
        previous = plan[index - 1].kind if index else None
        given, moments = moments, None   # x's moments; this step's output has none unless set
        # A fused-kernel conv hands a following norm its output's moments (free as it writes).
        hand_on = (module.native_winograd and index + 1 < len(plan)
                   and plan[index + 1].kind in ("res", "norm"))
        if step.kind == "conv":
            # "up" + conv: the conv of the repeated signal, at the input rate (1.5x fewer MACs).
            conv = (UpsampledConv1d(step.out_channels, step.kernel_size, name=step.name, **conv_kw)
                    if previous == "up" else
                    Conv1d(step.out_channels, step.kernel_size, name=step.name, **conv_kw))
            x = conv(x, with_moments=hand_on)
            if hand_on:
                x, moments = x
        elif step.kind == "down":  # pad right by one, then stride-2 width-3 valid conv: L -> L/2
            x = Conv1d(step.out_channels, 3, stride=2, padding=(0, 1), name=step.name, **kw)(x)
        elif step.kind == "up":
            if index + 1 == len(plan) or plan[index + 1].kind != "conv":  # else done by the conv
                x = jnp.repeat(x, 2, axis=1)
        elif step.kind == "res":
            x, moments = ResidualBlock(cfg, step.out_channels, module.native_winograd,
                                       name=step.name)(x, given)
        elif step.kind == "attn":
            x = AttentionBlock(cfg, name=step.name)(x)
        elif step.kind == "norm":
            x = GroupNorm(cfg.num_groups, name=step.name, **kw)(x, moments=given)
        elif step.kind == "silu":
            x = nn.silu(x)
        else:
            raise ValueError(f"unknown VAE plan step {step}")
    return x


class Encoder(nn.Module):
    """ECG `[B, L, 12]` -> (mean, log_variance), each `[B, L/8, latent_channels]` (float32)."""
    cfg: VAEConfig
    native_winograd: bool = False

    @nn.compact
    def __call__(self, ecg: jax.Array) -> tuple[jax.Array, jax.Array]:
        if ecg.shape[-1] != self.cfg.num_leads:
            raise ValueError(f"VAE encoder: expected [B, L, {self.cfg.num_leads}] leads-last, "
                             f"got {ecg.shape}")
        if ecg.shape[1] % self.cfg.downsampling:
            raise ValueError(f"VAE encoder: length {ecg.shape[1]} is not divisible by "
                             f"{self.cfg.downsampling}")
        moments = _run_plan(self, encoder_plan(self.cfg), ecg).astype(jnp.float32)
        mean, log_variance = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(log_variance, -30.0, 20.0)


class Decoder(nn.Module):
    """Scaled latent `[B, L/8, latent_channels]` -> ECG `[B, L, 12]` (float32)."""
    cfg: VAEConfig
    native_winograd: bool = False

    @nn.compact
    def __call__(self, latent: jax.Array) -> jax.Array:
        x = latent.astype(jnp.float32) / self.cfg.scaling_factor
        return _run_plan(self, decoder_plan(self.cfg), x.astype(self.cfg.dtype)).astype(jnp.float32)


class VAE(nn.Module):
    """`encode`, `decode` and the full pass `__call__(ecg, rng) -> (recon, mean, log_variance)`.

    `native_winograd` runs the Winograd convs through the fused CPU kernel (`kernels.winograd_conv`;
    `native_decoder` decides it by measurement); same parameters, rounding within ~1e-5.
    """
    cfg: VAEConfig
    native_winograd: bool = False

    def setup(self):
        self.encoder = Encoder(self.cfg, self.native_winograd)
        self.decoder = Decoder(self.cfg, self.native_winograd)

    def encode(self, ecg: jax.Array, noise: jax.Array | None = None):
        """ECG `[B, L, 12]` -> (scaled latent sample, mean, log_variance), each `[B, L/8, 4]`.

        `noise` (standard normal, `[B, L/8, 4]`) draws the sample; None returns the scaled mean.
        """
        mean, log_variance = self.encoder(ecg)
        latent = mean if noise is None else mean + jnp.exp(0.5 * log_variance) * noise
        return latent * self.cfg.scaling_factor, mean, log_variance

    def decode(self, latent: jax.Array) -> jax.Array:
        """Scaled latent `[B, L/8, 4]` -> ECG `[B, L, 12]`."""
        return self.decoder(latent)

    def __call__(self, ecg: jax.Array, noise: jax.Array | None = None):
        latent, mean, log_variance = self.encode(ecg, noise)
        return self.decode(latent), mean, log_variance


def vae_loss_terms(recon: jax.Array, ecg: jax.Array, mean: jax.Array, log_variance: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """(reconstruction, KL) as in DiffuSETS: squared error summed per example, KL to N(0, 1) summed
    over latent channels, both averaged over the batch (KL also over latent positions)."""
    reconstruction = jnp.sum(jnp.square(recon - ecg)) / ecg.shape[0]
    kl = 0.5 * (jnp.exp(log_variance) + jnp.square(mean) - 1.0 - log_variance)
    return reconstruction, jnp.mean(jnp.sum(kl, axis=-1))


def prepare_decoder(vae: VAE, variables: dict, latent_shape: tuple[int, ...]) -> dict:
    """`variables` plus the "prepared" collection: each fused-kernel conv's transformed, packed
    filters (`layers.conv`), computed once per weights so decode calls only read them. Unchanged
    for a VAE without `native_winograd`. `latent_shape` `[B, L/8, C]` (any B)."""
    if not vae.native_winograd:
        return variables
    variables = {name: tree for name, tree in variables.items() if name != "prepared"}

    def prepared(variables, latent):   # only the filters are returned: XLA drops the decode
        return vae.apply(variables, latent, method=VAE.decode, mutable=["prepared"])[1]
    return {**variables, **jax.jit(prepared)(variables, jnp.zeros(latent_shape, jnp.float32))}


def native_decoder(vae: VAE, variables: dict, latent_shape: tuple[int, ...]) -> tuple[VAE, dict]:
    """(VAE, variables) to decode latents `[B, L/8, C]` with: the fused Winograd kernel and its
    prepared filters where `kernels.winograd_conv.usable` says it wins here (measured once per CPU,
    model and batch by timing this decode both ways, then cached), else `vae` and `variables`
    as given. Only a Winograd VAE on one CPU device at f32 is a candidate."""
    from uniecg_jax.kernels import winograd_conv   # imports layers.conv, which this module uses
    if vae.cfg.conv_algorithm != "winograd" or vae.native_winograd:
        return vae, variables
    native = vae.clone(native_winograd=True)
    cfg = vae.cfg
    fields = {"model": "vae_decoder", "latent": list(latent_shape), "widths": list(cfg.widths),
              "num_res_blocks": cfg.num_res_blocks, "num_groups": cfg.num_groups,
              "num_leads": cfg.num_leads}
    prepared = {}

    def measure() -> dict[str, float]:
        latent = jnp.asarray(np.random.default_rng(0).standard_normal(latent_shape), jnp.float32)
        prepared["variables"] = prepare_decoder(native, variables, latent_shape)
        kernel, xla = (jax.jit(functools.partial(module.apply, method=VAE.decode))
                       for module in (native, vae))
        return winograd_conv.time_both({
            "kernel": lambda: kernel(prepared["variables"], latent),
            "xla": lambda: xla(variables, latent)})

    if not winograd_conv.usable(cfg.dtype, fields, measure, variables):
        return vae, variables
    return native, prepared.get("variables") or prepare_decoder(native, variables, latent_shape)


@functools.lru_cache(maxsize=8)
def abstract_vae_params(cfg: VAEConfig, length: int = 1024) -> Any:
    """ShapeDtypeStruct tree of the VAE's `params`."""
    return abstract_module_params(VAE(cfg), jnp.zeros((1, length, cfg.num_leads)))
