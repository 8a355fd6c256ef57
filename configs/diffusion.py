"""Text-to-ECG latent diffusion (DiffuSETS design): VAE, conditional UNet, schedule, sampling.

  uniecg train --config configs/diffusion.py:tiny --workdir /tmp/diffusion
  uniecg generate --ckpt /tmp/diffusion --text "sinus tachycardia" --hr 110 --age 60 --sex F --n 4 --out /tmp/gen
  uniecg convert diffusets --vae vae_model.pth --unet unet_model.pth --out /ckpt/diffusets

Variants: tiny (CPU, seconds per step), diffusets (the published sizes: VAE 128/256/512, UNet 7
levels, kernel 7; 1000 DDPM steps, betas 0.00085-0.012 "linear" as DiffuSETS's diffusers default;
trained and sampled as DiffuSETS does, see below).

Text encoders (`text.encoder`): minilm | hash[:D] | precomputed:FILE.npz |
endpoint:MODEL@BASE_URL (any OpenAI-compatible /v1/embeddings service; `text.endpoint` holds the
key's environment variable, batch size, timeout and retries), e.g.
  uniecg generate --ckpt W --text "Sinus rhythm|Normal ECG." --hr 80 --age 50 --sex M --out DIR \
      --text-encoder endpoint:text-embedding-ada-002@https://api.openai.com/v1 --template diffusets
"""
import ml_collections

from uniecg_jax.diffusion.schedule import DiffusionConfig
from uniecg_jax.models import presets
from uniecg_jax.models.unet import UNetConfig
from uniecg_jax.models.vae import VAEConfig
from uniecg_jax.train.schema import DiffusionTrainConfig, train_group


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
        template="plain",          # plain | diffusets ("Most importantly, the 1st diagnosis is ...")
        # endpoint:MODEL@BASE_URL encoders (data.text_encoder.EndpointOptions)
        endpoint=ml_collections.ConfigDict(dict(api_key_env="OPENAI_API_KEY", batch_size=64,
                                                timeout_s=60.0, max_retries=4, backoff_s=1.0))))
    config.data = ml_collections.ConfigDict(dict(
        signal_length=1024, sample_rate=102.4, num_leads=12,
        source="bundled",          # "bundled" (+ synthetic ECGs) or a `uniecg prep` folder
        num_synthetic=16, synthetic_heart_rates=(45., 60., 75., 90., 105., 120.),
        cache_dir="",              # synthetic ECG cache ("" = WORKDIR/data_cache)
        worker_count=0))
    config.model = ml_collections.ConfigDict()
    # The field defaults are DiffuSETS's published shapes (VAEConfig, UNetConfig, DiffusionConfig
    # document each field); `model.unet.num_train_steps` comes from `diffusion.num_steps`.
    config.model.vae = ml_collections.ConfigDict(VAEConfig().to_dict())
    config.model.unet = ml_collections.ConfigDict(UNetConfig().to_dict())
    config.model.unet.text_embed_dim = config.text.get_ref("embed_dim")
    config.diffusion = ml_collections.ConfigDict(DiffusionConfig().to_dict())
    config.train = train_group(DiffusionTrainConfig(
        batch_size=256, steps=100000, learning_rate=1e-4, warmup_steps=1000, weight_decay=0.01,
        b2=0.999, log_every=100, checkpoint_every=5000))
    config.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=50, guidance=1.0, eta=0.0,
                                                   output_rate=102.4))
    if variant == "diffusets":
        # As DiffuSETS trains and samples (PKUDigitalHealth/DiffuSETS b610a00): utils/train.py
        # draws `t = torch.randint(1, num_train_timesteps - 1)` (1..998) and never drops the
        # condition; AdamW(lr) with CosineAnnealingLR(eta_min=0.1 lr) per step, no warmup, no
        # gradient clipping; Inference_config.json: lr 1e-3, batch 2048, 1000 DDPM inference
        # steps (utils/inference.py runs every DDPMScheduler step, no guidance). DDIM and guidance
        # are one flag away (`uniecg generate --sampler ddim --steps 50 --guidance 2`), but with
        # cfg_dropout=0 the null condition is untrained: train with diffusion.cfg_dropout=0.1 first.
        config.diffusion.update(dict(cfg_dropout=0.0, train_timestep_low=1,
                                     train_timestep_high=999))
        config.train.update(dict(batch_size=2048, learning_rate=1e-3, warmup_steps=0,
                                 min_lr_ratio=0.1, grad_clip=0.0))
        config.sample.update(dict(sampler="ddpm", steps=1000, guidance=1.0))
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
        # augment_roll: each ECG and its beat phase are rotated together, so a small model cannot
        # tie beat positions to a record and must read them from the rhythm condition (the demo's
        # guidance-1 HR MAE 18.1 -> 12.3 bpm). An EMA of the weights (train.ema_decay=0.999) made
        # it worse at the demo's 2400 steps (16.3 bpm): the average lags a model still learning.
        config.train.update(dict(batch_size=8, steps=200, learning_rate=1e-3, warmup_steps=10,
                                 log_every=10, checkpoint_every=100, vae_steps=200, unet_steps=200,
                                 augment_roll=True))
        # The demo-sized model follows its rhythm only with guidance (see diffusion/demo.py).
        config.sample.update(dict(steps=20, guidance=3.0))
    return config
