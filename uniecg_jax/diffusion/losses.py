"""Pure loss functions for the generic train loop: `(loss, metrics) = fn(params, batch, rng, model,
cfg)`, differentiable in `params`.

Batches (from the diffusion data pipeline): `ecg` `[B, 12, L]` (or `[B, L, 12]`) in mV; for the UNet
either `latent` `[B, L/8, 4]` (precomputed, scaled) or `ecg` plus a frozen VAE; and either
`condition` `[B, D + 3]` or `text_embedding` `[B, D]`, `sex` `[B]` (M=1/F=0), `age` `[B]`, `hr` `[B]`;
for rhythm-conditioned UNets, `rhythm` `[B, T, 2]` beat-phase features (`diffusion.rhythm`).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from uniecg_jax.diffusion import schedule as schedule_lib
from uniecg_jax.diffusion.rhythm import pool_rhythm
from uniecg_jax.models.unet import ConditionalUNet
from uniecg_jax.models.vae import VAE, vae_loss_terms
from uniecg_jax.data.augment import roll_in_time


def leads_last(ecg: jax.Array, num_leads: int = 12) -> jax.Array:
    """`[B, 12, L]` or `[B, L, 12]` -> `[B, L, 12]`."""
    if ecg.ndim != 3 or num_leads not in (ecg.shape[1], ecg.shape[2]):
        raise ValueError(f"batch['ecg'] must be [B, {num_leads}, L] or [B, L, {num_leads}], "
                         f"got {ecg.shape}")
    return ecg if ecg.shape[-1] == num_leads else jnp.swapaxes(ecg, 1, 2)


def condition_from_batch(batch: Mapping[str, jax.Array]) -> jax.Array:
    """`[B, D + 3]`: `batch['condition']`, or text_embedding ++ (sex, age, hr)."""
    if "condition" in batch:
        return batch["condition"].astype(jnp.float32)
    scalars = [batch[k].astype(jnp.float32).reshape(-1, 1) for k in ("sex", "age", "hr")]
    return jnp.concatenate([batch["text_embedding"].astype(jnp.float32)] + scalars, axis=-1)


def latent_rhythm(rhythm: jax.Array | None, model: ConditionalUNet) -> jax.Array | None:
    """A batch's `rhythm` `[B, T, 2]` pooled to the latent length, for rhythm-conditioned UNets
    (None otherwise, or when the batch has no rhythm: unknown)."""
    if not model.cfg.rhythm_condition or rhythm is None:
        return None
    return pool_rhythm(rhythm.astype(jnp.float32), model.cfg.latent_length)


def vae_loss(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, model: VAE, cfg
             ) -> tuple[jax.Array, dict]:
    """DiffuSETS VAE objective: summed squared error per example + `train.kl_weight` x KL."""
    ecg = leads_last(batch["ecg"], model.cfg.num_leads).astype(jnp.float32)
    latent_shape = (ecg.shape[0], ecg.shape[1] // model.cfg.downsampling,
                    model.cfg.latent_channels)
    noise = jax.random.normal(rng, latent_shape, jnp.float32)
    recon, mean, log_variance = model.apply(params, ecg, noise)
    reconstruction, kl = vae_loss_terms(recon, ecg, mean, log_variance)
    loss = reconstruction + cfg.train.kl_weight * kl
    return loss, {"loss": loss, "reconstruction": reconstruction, "kl": kl,
                  "mse": jnp.mean(jnp.square(recon - ecg))}


def diffusion_loss(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                   model: ConditionalUNet, cfg, vae: VAE | None = None, vae_params: Any = None
                   ) -> tuple[jax.Array, dict]:
    """Denoising MSE (eps or v target) at uniform random timesteps in `diffusion.train_timestep_low`
    .. `_high` (default: all), with condition dropout
    (`diffusion.cfg_dropout`) for classifier-free guidance. Latents come from `batch['latent']`
    or from the frozen VAE (sampled, scaled, no gradient)."""
    schedule = schedule_lib.NoiseSchedule.from_config(cfg.diffusion)
    low, high = schedule_lib.training_timestep_range(
        schedule_lib.DiffusionConfig.from_config(cfg.diffusion))
    t_key, noise_key, drop_key, vae_key = jax.random.split(rng, 4)
    rhythm = batch.get("rhythm")
    if "latent" in batch:
        if cfg.train.augment_roll:
            raise ValueError("train.augment_roll rotates ECGs before the VAE; it cannot be used "
                             "with precomputed latents")
        latent = batch["latent"].astype(jnp.float32)
    else:
        if vae is None or vae_params is None:
            raise ValueError("diffusion_loss: batch has no 'latent'; pass the frozen vae and "
                             "vae_params to encode batch['ecg']")
        ecg = leads_last(batch["ecg"], vae.cfg.num_leads).astype(jnp.float32)
        if cfg.train.augment_roll:   # own key: runs without it draw exactly as before
            roll_key = jax.random.fold_in(rng, 1)
            if rhythm is None:
                (ecg,) = roll_in_time((ecg,), roll_key)
            else:
                ecg, rhythm = roll_in_time((ecg, rhythm), roll_key)
        shape = (ecg.shape[0], ecg.shape[1] // vae.cfg.downsampling, vae.cfg.latent_channels)
        # DiffuSETS trains on a draw from the VAE posterior; "mean" trains on its mean, which a
        # weak VAE's posterior noise would otherwise leave in every generated latent.
        noise = (None if cfg.diffusion.get("latent", "sample") == "mean"
                 else jax.random.normal(vae_key, shape))
        latent, _, _ = vae.apply(vae_params, ecg, noise, method=VAE.encode)
        latent = jax.lax.stop_gradient(latent)
    batch_size = latent.shape[0]
    timesteps = jax.random.randint(t_key, (batch_size,), low, high)
    noise = jax.random.normal(noise_key, latent.shape, jnp.float32)
    noisy = schedule_lib.add_noise(schedule, latent, noise, timesteps)
    drop = jax.random.bernoulli(drop_key, cfg.diffusion.cfg_dropout, (batch_size,))
    output = model.apply(params, noisy, timesteps, condition_from_batch(batch), drop,
                         latent_rhythm(rhythm, model))
    target = schedule_lib.training_target(schedule, latent, noise, timesteps)
    loss = jnp.mean(jnp.square(output - target))
    return loss, {"loss": loss, "dropped_fraction": jnp.mean(drop.astype(jnp.float32))}
