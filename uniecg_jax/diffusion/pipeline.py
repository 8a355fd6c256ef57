"""Text-conditioned ECG generation: condition -> latent sampling (DDPM/DDIM, guidance) -> VAE decode.

    pipeline = DiffusionPipeline.from_config(config, vae_params, unet_params)
    ecgs = pipeline.generate(text_embedding, sex="F", age=60, hr=110, n=4, sampler="ddim",
                             steps=50, guidance=1.0, seed=0)          # np [4, 12, 1024] in mV
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax import checkpoint
from uniecg_jax.config import replace_values
from uniecg_jax.data.record import DIFFUSION_FS, resample
from uniecg_jax.diffusion import schedule as schedule_lib
from uniecg_jax.diffusion.conditioning import build_condition, repeat_conditions
from uniecg_jax.diffusion.rhythm import pool_rhythm, requested_rhythm
from uniecg_jax.errors import CheckpointError
from uniecg_jax.models.unet import ConditionalUNet, UNetConfig, abstract_unet_params
from uniecg_jax.models.vae import VAE, VAEConfig, abstract_vae_params, native_decoder
from uniecg_jax.sharding import HostDataParallel

def guided_denoiser(unet: ConditionalUNet, unet_params: Any, condition: jax.Array,
                    guidance: float, rhythm: jax.Array | None = None):
    """`(x_t, t) -> output` with classifier-free guidance `u + g (c - u)`.

    g = 1 runs only the conditional model, g = 0 only the unconditional (null-condition, no rhythm)
    one; otherwise both share one batched UNet call. `rhythm` `[B, L, 2]`: beat-phase features for
    rhythm-conditioned UNets.
    """
    batch = condition.shape[0]

    def conditional(x, t):
        return unet.apply(unet_params, x, t, condition, None, rhythm)

    def unconditional(x, t):
        return unet.apply(unet_params, x, t, condition, jnp.ones((batch,), bool), rhythm)

    if guidance == 1.0:
        return conditional
    if guidance == 0.0:
        return unconditional

    def guided(x, t):
        both = unet.apply(unet_params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                          jnp.concatenate([condition, condition]),
                          jnp.arange(2 * batch) >= batch,
                          None if rhythm is None else jnp.concatenate([rhythm, rhythm]))
        cond_out, uncond_out = both[:batch], both[batch:]
        return uncond_out + guidance * (cond_out - uncond_out)
    return guided


class DiffusionPipeline:
    """A VAE + conditional UNet + noise schedule, with jitted batched seeded sampling."""

    def __init__(self, vae: VAE, vae_params: Any, unet: ConditionalUNet, unet_params: Any,
                 schedule: schedule_lib.NoiseSchedule, signal_length: int = 1024,
                 default_guidance: float = 1.0):
        self.vae, self.vae_params = vae, vae_params
        self.unet, self.unet_params = unet, unet_params
        self.schedule = schedule
        self.signal_length = signal_length
        self.default_guidance = float(default_guidance)   # `sample.guidance` of the model config
        self._compiled: dict = {}
        self._decoders: dict[int, tuple[VAE, Any]] = {}   # rows -> (VAE, variables) decoding them
        self._data_parallel: HostDataParallel | None = None
        self._parallel_params: tuple[Any, Any] | None = None

    @classmethod
    def from_config(cls, config, vae_params: Any, unet_params: Any) -> "DiffusionPipeline":
        """From a `configs/diffusion.py` config and `{"params": ...}` trees."""
        unet_cfg = UNetConfig.from_config(config.model.unet, config.diffusion.num_steps)
        guidance = config.sample.get("guidance", 1.0) if "sample" in config else 1.0
        return cls(VAE(VAEConfig.from_config(config.model.vae)), vae_params,
                   ConditionalUNet(unet_cfg), unet_params,
                   schedule_lib.NoiseSchedule.from_config(config.diffusion),
                   int(config.data.signal_length), guidance)

    def _sampler(self, sampler: str, steps: int, guidance: float, eta: float, decode: bool,
                 vae: VAE | None = None):
        vae = vae or self.vae
        key = (sampler, steps, float(guidance), float(eta), decode, vae.native_winograd)
        if key not in self._compiled:
            cfg = self.unet.cfg

            def run(unet_params, vae_params, condition, rhythm, rng):
                shape = (condition.shape[0], cfg.latent_length, cfg.latent_channels)
                denoise = guided_denoiser(self.unet, unet_params, condition, guidance, rhythm)
                latent = schedule_lib.sample(denoise, self.schedule, shape, rng, sampler, steps, eta)
                if not decode:
                    return latent
                return vae.apply(vae_params, latent, method=VAE.decode)
            self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    def decoder_for(self, rows: int) -> tuple[VAE, Any]:
        """(VAE, variables) decoding `rows` latents: a Winograd VAE runs the fused CPU kernel with
        filters prepared once where it is measured to win here (`models.vae.native_decoder`)."""
        if rows not in self._decoders:
            cfg = self.unet.cfg
            self._decoders[rows] = native_decoder(
                self.vae, self.vae_params, (rows, cfg.latent_length, cfg.latent_channels))
        return self._decoders[rows]

    def rhythm_for(self, heart_rates, seed: int) -> np.ndarray | None:
        """`[N, L/8, 2]` beat-phase features of regular beats at each row's heart rate (first beat
        drawn from `seed`) for a rhythm-conditioned UNet; None for other UNets."""
        if not self.unet.cfg.rhythm_condition:
            return None
        features = requested_rhythm(heart_rates, self.signal_length / DIFFUSION_FS,
                                    self.signal_length, seed)
        return pool_rhythm(features, self.unet.cfg.latent_length)

    def sample_latents(self, condition: np.ndarray, sampler: str = "ddim", steps: int = 50,
                       guidance: float | None = None, eta: float = 0.0, seed: int = 0,
                       rhythm: np.ndarray | None = None) -> np.ndarray:
        """Condition `[N, D + 3]` -> latents `[N, L/8, 4]` (no decoding). `rhythm` `[N, L/8, 2]`
        (rhythm-conditioned UNets; None = unknown rhythm). guidance None = `default_guidance`."""
        guidance = self.default_guidance if guidance is None else guidance
        fn = self._sampler(sampler, steps, guidance, eta, decode=False)
        return np.asarray(fn(self.unet_params, self.vae_params, jnp.asarray(condition),
                             None if rhythm is None else jnp.asarray(rhythm),
                             jax.random.PRNGKey(seed)))

    def generate(self, text_embedding, sex, age, hr, n: int = 1, sampler: str = "ddim",
                 steps: int = 50, guidance: float | None = None, seed: int = 0, eta: float = 0.0,
                 sample_rate: float = DIFFUSION_FS, data_parallel: bool = False) -> np.ndarray:
        """ECGs `[N, 12, T]` in mV: `n` samples for each of the B conditions (N = B * n).

        Args:
          text_embedding: `[D]` or `[B, D]`; sex "M"/"F"; age years; hr bpm (scalars or `[B]`).
          sampler: "ddpm" (all training steps, the reference) or "ddim" (`steps` steps, `eta`).
          guidance: classifier-free guidance scale (1 = conditional, 0 = unconditional; None =
            the model config's `sample.guidance`).
            A rhythm-conditioned UNet also gets regular beats at `hr` (first beat from `seed`).
          sample_rate: 102.4 (native, T = 1024) or e.g. 500 (T = 5000, polyphase resampling).
          data_parallel: shard the N rows over this host's devices (padded to a multiple of the
            device count; the noise of row i does not depend on N, so the rows are the same).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        guidance = self.default_guidance if guidance is None else guidance
        condition = build_condition(text_embedding, sex, age, hr, self.unet.cfg.text_embed_dim)
        condition = repeat_conditions(condition, n)
        rhythm = self.rhythm_for(condition[:, -1], seed)   # the last condition column is the rate
        rows = len(condition)
        # Data parallel: XLA's own convs (the kernel's custom call has no sharding rule).
        vae, vae_params = (self.vae, self.vae_params) if data_parallel else self.decoder_for(rows)
        fn = self._sampler(sampler, steps, guidance, eta, decode=True, vae=vae)
        params, put = (self.unet_params, vae_params), jnp.asarray
        if data_parallel:
            if self._data_parallel is None:
                self._data_parallel = HostDataParallel()
            padded = -rows % self._data_parallel.num_devices
            condition = np.concatenate([condition, np.repeat(condition[-1:], padded, 0)])
            if rhythm is not None:
                rhythm = np.concatenate([rhythm, np.repeat(rhythm[-1:], padded, 0)])
            if self._parallel_params is None or any(
                    a is not b for a, b in zip(self._parallel_params, params)):
                self._parallel_params = params   # one object, so its replicas are reused
            params, put = self._data_parallel.place(self._parallel_params, len(condition))
        ecg = np.asarray(fn(*params, put(condition), None if rhythm is None else put(rhythm),
                            jax.random.PRNGKey(seed)))[:rows]
        ecg = np.swapaxes(ecg, 1, 2)  # [N, L, 12] -> [N, 12, L]
        return resample(ecg, DIFFUSION_FS, sample_rate)



def load_pipeline(path: str, conv_algorithm: str | None = None) -> tuple[DiffusionPipeline, Any]:
    """(pipeline, config) from a model checkpoint written by `uniecg train` (W/model) or
    `uniecg convert diffusets`; `path` may also be the train workdir W. Params are `{"vae", "unet"}`;
    a missing part or a wrong shape raises CheckpointError naming the tensor. `conv_algorithm`
    ("direct" | "winograd"; None: the checkpoint's `model.vae.conv_algorithm`) picks how the VAE
    runs its convolutions, same weights either way (`layers.conv`; Winograd decodes batches of 4 and
    more faster, within ~1e-5 relative of direct)."""
    if not os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)) and os.path.isfile(
            os.path.join(path, "model", checkpoint.CONFIG_FILE)):
        path = os.path.join(path, "model")
    config = checkpoint.load_model_config(path)
    if "model" not in config or "unet" not in config.model or "vae" not in config.model:
        raise CheckpointError(f"{path}: config.json has no model.vae/model.unet; not a diffusion "
                              "model checkpoint")
    if conv_algorithm is not None:   # the whole group: configs older than the field lack the key
        config = replace_values(config, {"model.vae": {**config.model.vae.to_dict(),
                                                       "conv_algorithm": conv_algorithm}})
    unet_cfg = UNetConfig.from_config(config.model.unet, config.diffusion.num_steps)
    vae_cfg = VAEConfig.from_config(config.model.vae)   # a bad conv_algorithm fails here
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"unet": abstract_unet_params(unet_cfg),
                "vae": abstract_vae_params(vae_cfg, int(config.data.signal_length))}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract)
    params, _ = checkpoint.restore_model(path, abstract)   # its config is the one read above
    pipeline = DiffusionPipeline.from_config(config, {"params": params["vae"]},
                                             {"params": params["unet"]})
    return pipeline, config
