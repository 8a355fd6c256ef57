"""DDPM noise schedule, training targets, and the DDPM / DDIM samplers (on-device loops).

Conventions follow `diffusers` as DiffuSETS uses it (`DDPMScheduler(num_train_timesteps=1000,
beta_start=0.00085, beta_end=0.012)`, whose default `beta_schedule` is "linear", with
`clip_sample=True` and "fixed_small" variance). "scaled_linear" (Stable Diffusion) is an option.
Latents are `[B, L, C]`; timesteps are int32 in [0, num_steps).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.models.schema import ConfigSchema


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(ConfigSchema):
    """The schema of `config.diffusion`: the noise schedule and the training target."""
    config_group = "diffusion"
    num_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"    # linear (DiffuSETS/diffusers default) | scaled_linear (SD)
    prediction: str = "epsilon"      # epsilon | v
    clip_sample: float = 1.0         # DDPM/DDIM clip of predicted x0 (diffusers default); 0 = off
    cfg_dropout: float = 0.1         # probability of the null condition in training
    # Training timesteps are drawn uniformly from [train_timestep_low, train_timestep_high)
    # (high 0 = num_steps). DiffuSETS draws `torch.randint(1, num_train_timesteps - 1)`: 1..998.
    train_timestep_low: int = 0
    train_timestep_high: int = 0
    # UNet targets: "sample" of the VAE posterior (DiffuSETS) | its "mean"
    latent: str = "sample"


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Betas and cumulative alphas `[num_steps]` (float32) plus the prediction target."""
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    prediction: str = "epsilon"     # epsilon | v
    clip_sample: float = 1.0        # clip predicted x0 to [-c, c]; 0 disables

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_config(cls, diffusion_cfg) -> "NoiseSchedule":
        """From `config.diffusion` (read strictly as a `DiffusionConfig`)."""
        cfg = DiffusionConfig.from_config(diffusion_cfg)
        return make_schedule(cfg.num_steps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                             cfg.prediction, cfg.clip_sample)


def make_schedule(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                  beta_schedule: str = "linear", prediction: str = "epsilon",
                  clip_sample: float = 1.0) -> NoiseSchedule:
    """linear: betas evenly spaced; scaled_linear: sqrt(betas) evenly spaced."""
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2
    else:
        raise ValueError(f"diffusion.beta_schedule must be linear or scaled_linear, "
                         f"got {beta_schedule!r}")
    if prediction not in ("epsilon", "v"):
        raise ValueError(f"diffusion.prediction must be epsilon or v, got {prediction!r}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(betas.astype(np.float32), alphas_cumprod.astype(np.float32), prediction,
                         float(clip_sample))


def training_timestep_range(cfg: DiffusionConfig) -> tuple[int, int]:
    """`[low, high)` of the uniform training timesteps (`train_timestep_low/high`), validated."""
    high = cfg.train_timestep_high or cfg.num_steps
    if not 0 <= cfg.train_timestep_low < high <= cfg.num_steps:
        raise ValueError(f"diffusion.train_timestep_low/high must satisfy 0 <= low < high <= "
                         f"num_steps={cfg.num_steps}, got [{cfg.train_timestep_low}, {high})")
    return cfg.train_timestep_low, high


def _gather(values: np.ndarray, timesteps: jax.Array, ndim: int) -> jax.Array:
    """values[t] shaped `[B, 1, ...]` to broadcast against a `ndim`-rank batch."""
    picked = jnp.asarray(values)[timesteps]
    return picked.reshape(picked.shape + (1,) * (ndim - 1))


def add_noise(schedule: NoiseSchedule, clean: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
    """q(x_t | x_0): `sqrt(a_t) x0 + sqrt(1 - a_t) eps`."""
    a = _gather(schedule.alphas_cumprod, timesteps, clean.ndim)
    return jnp.sqrt(a) * clean + jnp.sqrt(1.0 - a) * noise


def training_target(schedule: NoiseSchedule, clean: jax.Array, noise: jax.Array,
                    timesteps: jax.Array) -> jax.Array:
    """What the network regresses: eps, or v = sqrt(a) eps - sqrt(1 - a) x0."""
    if schedule.prediction == "epsilon":
        return noise
    a = _gather(schedule.alphas_cumprod, timesteps, clean.ndim)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * clean


def split_prediction(schedule: NoiseSchedule, noisy: jax.Array, model_output: jax.Array,
                     timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Model output -> (predicted x0, predicted eps)."""
    a = _gather(schedule.alphas_cumprod, timesteps, noisy.ndim)
    if schedule.prediction == "epsilon":
        eps = model_output
        x0 = (noisy - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    else:
        x0 = jnp.sqrt(a) * noisy - jnp.sqrt(1.0 - a) * model_output
        eps = jnp.sqrt(a) * model_output + jnp.sqrt(1.0 - a) * noisy
    return x0, eps


def _alpha_prev(schedule: NoiseSchedule, prev_timesteps: jax.Array, ndim: int) -> jax.Array:
    # Before step 0 the sample is clean: alpha_cumprod = 1 (diffusers' set_alpha_to_one).
    a = _gather(schedule.alphas_cumprod, jnp.maximum(prev_timesteps, 0), ndim)
    return jnp.where(prev_timesteps.reshape((-1,) + (1,) * (ndim - 1)) >= 0, a, 1.0)


def _clip(schedule: NoiseSchedule, x0: jax.Array) -> jax.Array:
    return jnp.clip(x0, -schedule.clip_sample, schedule.clip_sample) if schedule.clip_sample else x0


def ddpm_step(schedule: NoiseSchedule, noisy: jax.Array, model_output: jax.Array,
              timesteps: jax.Array, noise: jax.Array) -> jax.Array:
    """Ancestral step x_t -> x_{t-1} (posterior mean + "fixed_small" variance; no noise at t=0)."""
    ndim = noisy.ndim
    a_t = _gather(schedule.alphas_cumprod, timesteps, ndim)
    a_prev = _alpha_prev(schedule, timesteps - 1, ndim)
    x0, _ = split_prediction(schedule, noisy, model_output, timesteps)
    x0 = _clip(schedule, x0)
    alpha_t = a_t / a_prev
    beta_t = 1.0 - alpha_t
    mean = (jnp.sqrt(a_prev) * beta_t * x0 + jnp.sqrt(alpha_t) * (1.0 - a_prev) * noisy) / (1 - a_t)
    variance = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
    has_noise = (timesteps > 0).reshape((-1,) + (1,) * (ndim - 1))
    return mean + jnp.where(has_noise, jnp.sqrt(variance) * noise, 0.0)


def ddim_step(schedule: NoiseSchedule, noisy: jax.Array, model_output: jax.Array,
              timesteps: jax.Array, prev_timesteps: jax.Array, noise: jax.Array,
              eta: float = 0.0) -> jax.Array:
    """DDIM step x_t -> x_prev (eta = 0: deterministic; eta = 1: DDPM-like variance)."""
    ndim = noisy.ndim
    a_t = _gather(schedule.alphas_cumprod, timesteps, ndim)
    a_prev = _alpha_prev(schedule, prev_timesteps, ndim)
    x0, eps = split_prediction(schedule, noisy, model_output, timesteps)
    if schedule.clip_sample:
        x0 = _clip(schedule, x0)
        eps = (noisy - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
    return jnp.sqrt(a_prev) * x0 + direction + sigma * noise


def sampling_timesteps(schedule: NoiseSchedule, sampler: str, steps: int) -> np.ndarray:
    """Descending timesteps: DDPM uses all; DDIM `steps` "leading"-spaced ones (diffusers)."""
    if sampler == "ddpm":
        return np.arange(schedule.num_steps)[::-1].copy()
    if sampler != "ddim":
        raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
    if not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"ddim steps must be in [1, {schedule.num_steps}], got {steps}")
    stride = schedule.num_steps // steps
    return (np.arange(steps) * stride)[::-1].copy()


def sample(denoise: Callable[[jax.Array, jax.Array], jax.Array], schedule: NoiseSchedule,
           shape: tuple[int, ...], rng: jax.Array, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0) -> jax.Array:
    """Runs the reverse process with `lax.scan` (trace once, loop on device; jit the caller).

    Args:
      denoise: `(x_t [B, ...], t [B]) -> model output [B, ...]` (eps or v).
      shape: latent shape `[B, L, C]`; rng: key for the initial noise and per-step noise.
    Returns the final latent `[B, L, C]` (float32).
    """
    timesteps = sampling_timesteps(schedule, sampler, steps)
    stride = schedule.num_steps // steps if sampler == "ddim" else 1
    init_key, loop_key = jax.random.split(rng)
    x = jax.random.normal(init_key, shape, jnp.float32)
    keys = jax.random.split(loop_key, len(timesteps))

    def body(x, step):
        t, key = step
        t_batch = jnp.full((shape[0],), t, jnp.int32)
        output = denoise(x, t_batch).astype(jnp.float32)
        noise = jax.random.normal(key, shape, jnp.float32)
        if sampler == "ddpm":
            return ddpm_step(schedule, x, output, t_batch, noise), None
        return ddim_step(schedule, x, output, t_batch, t_batch - stride, noise, eta), None

    x, _ = jax.lax.scan(body, x, (jnp.asarray(timesteps, jnp.int32), keys))
    return x
