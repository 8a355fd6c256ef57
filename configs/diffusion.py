"""Text-to-ECG latent diffusion (DiffuSETS design): VAE, conditional UNet, schedule, sampling.

  uniecg train --config configs/diffusion.py:tiny --workdir /tmp/diffusion
  uniecg generate --ckpt /tmp/diffusion --text "sinus tachycardia" --hr 110 --age 60 --sex F --n 4 --out /tmp/gen
  uniecg convert diffusets --vae vae_model.pth --unet unet_model.pth --out /ckpt/diffusets

Variants: tiny (CPU, seconds per step), diffusets (the published sizes: VAE 128/256/512, UNet 7
levels, kernel 7; 1000 DDPM steps, betas 0.00085-0.012 "linear" as DiffuSETS's diffusers default).
"""
import ml_collections

from uniecg_jax.models import presets


def get_config(arg=None):
    variant = arg or "tiny"
    if variant not in ("tiny", "diffusets"):
        raise KeyError(f"unknown diffusion preset {variant!r}; choose from ['diffusets', 'tiny']")
    config = ml_collections.ConfigDict()
    config.objective = "diffusion"   # `uniecg train`: VAE phase, then the UNet on frozen latents
    config.seed = 0
    config.distributed = False
    config.mesh = presets.mesh()
    config.text = ml_collections.ConfigDict(dict(
        encoder="minilm",          # frozen text encoder of the data layer (all-MiniLM-L6-v2)
        embed_dim=384,             # width of text embeddings (any width for precomputed ones)
        template="plain"))         # plain | diffusets ("Most importantly, the 1st diagnosis is ...")
    config.data = ml_collections.ConfigDict(dict(
        signal_length=1024, sample_rate=102.4, num_leads=12,
        source="bundled",          # "bundled" (+ synthetic ECGs) or a `uniecg prep` folder
        num_synthetic=16, synthetic_heart_rates=(45., 60., 75., 90., 105., 120.),
        cache_dir="",              # synthetic ECG cache ("" = WORKDIR/data_cache)
        worker_count=0))
    config.model = ml_collections.ConfigDict()
    config.model.vae = ml_collections.ConfigDict(dict(
        num_leads=12, widths=(128, 256, 512), num_res_blocks=2, latent_channels=4, num_groups=32,
        attention_heads=1, scaling_factor=0.18215, dtype="float32", param_dtype="float32",
        # True: after the VAE phase, scaling_factor = 1 / std of its latents (unit-variance data
        # for the DDPM schedule). False keeps DiffuSETS's 0.18215 (imported weights).
        auto_scale=False))
    config.model.unet = ml_collections.ConfigDict(dict(
        latent_channels=4, latent_length=128, num_levels=7, kernel_size=7, num_heads=8,
        bottleneck_kernel_size=3, bottleneck_heads=4, bottleneck_hidden=32,
        text_embed_dim=config.text.get_ref("embed_dim"), time_embed_dim=64, time_hidden_dim=128,
        base_channels=0,                            # 0 = DiffuSETS (widths from latent_channels)
        scalar_condition_scale=(1.0, 1.0, 1.0),     # x (sex, age, hr); DiffuSETS feeds raw values
        rhythm_condition=False,    # True: beat-phase input channels (diffusion/rhythm.py)
        dtype="float32", param_dtype="float32"))
    config.diffusion = ml_collections.ConfigDict(dict(
        num_steps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="linear",    # linear (DiffuSETS/diffusers default) | scaled_linear (SD)
        prediction="epsilon",      # epsilon | v
        clip_sample=1.0,           # DDPM/DDIM clip of predicted x0 (diffusers default); 0 = off
        cfg_dropout=0.1,           # probability of the null condition in training
        latent="sample"))          # UNet targets: "sample" of the VAE posterior (DiffuSETS) | "mean"
    config.train = ml_collections.ConfigDict(dict(
        batch_size=256, steps=100000, learning_rate=1e-4, warmup_steps=1000, weight_decay=0.01,
        grad_clip=1.0, log_every=100, checkpoint_every=5000, keep_checkpoints=2,
        kl_weight=1.0, vae_steps=50000, unet_steps=100000, min_lr_ratio=0.1, b1=0.9, b2=0.999,
        grad_accum_steps=1, freeze=""))
    config.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=50, guidance=1.0, eta=0.0,
                                                   output_rate=102.4))
    if variant == "tiny":
        config.model.vae.update(dict(widths=(16, 32, 64), num_res_blocks=1, num_groups=8,
                                     auto_scale=True))
        # A 32-wide input conv (DiffuSETS's 4-wide first block underfits badly at 3 levels),
        # scalars scaled to ~1 beside the unit-norm text embedding, and the beat phase as input
        # channels (a small model trained briefly ignores a heart-rate scalar; see rhythm.py).
        config.model.unet.update(dict(num_levels=3, num_heads=2, bottleneck_heads=2,
                                      bottleneck_hidden=32, base_channels=32,
                                      scalar_condition_scale=(1.0, 0.01, 0.01),
                                      rhythm_condition=True))
        # v targets weight the clean signal at high noise, where the beat layout is decided;
        # posterior means keep a small VAE's posterior noise out of the generated latents; and
        # auto_scale gives unit-variance latents, so x0 is clipped at 3 sigma rather than 1.
        config.diffusion.update(dict(prediction="v", latent="mean", clip_sample=3.0))
        config.train.update(dict(batch_size=8, steps=200, learning_rate=1e-3, warmup_steps=10,
                                 log_every=10, checkpoint_every=100, vae_steps=200, unet_steps=200))
        # The demo-sized model follows its rhythm only with guidance (see diffusion/demo.py).
        config.sample.update(dict(steps=20, guidance=3.0))
    return config
