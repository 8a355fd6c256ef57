"""Diffusion models: shapes, schedule/DDIM closed forms, guidance, conditioning errors, loss regression."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uniecg_jax.config import load_config
from uniecg_jax.diffusion import schedule as sch
from uniecg_jax.data.prompts import diffusets_prompt
from uniecg_jax.diffusion.conditioning import ConditionError, build_condition
from uniecg_jax.layers.params import init_params_on_host
from uniecg_jax.diffusion.losses import diffusion_loss, vae_loss
from uniecg_jax.diffusion.pipeline import DiffusionPipeline, guided_denoiser
from uniecg_jax.diffusion.rhythm import requested_rhythm
from uniecg_jax.models.unet import ConditionalUNet, UNetConfig
from uniecg_jax.models.vae import VAE, VAEConfig

TEXT_DIM = 8


@pytest.mark.parametrize("widths,blocks,length", [((16, 32, 64), 1, 1024),
                                                  ((128, 256, 512), 2, 1024),
                                                  ((8, 16, 32, 64), 1, 512)])
def test_vae_shapes(widths, blocks, length):
    cfg = VAEConfig(widths=widths, num_res_blocks=blocks, num_groups=8)
    ecg = jnp.zeros((2, length, 12))
    (latent, mean, _), _ = jax.eval_shape(
        lambda: VAE(cfg).init_with_output(jax.random.PRNGKey(0), ecg, method=VAE.encode))
    assert latent.shape == mean.shape == (2, length // 2 ** len(widths), 4)
    recon, _ = jax.eval_shape(lambda: VAE(cfg).init_with_output(
        jax.random.PRNGKey(0), jnp.zeros(latent.shape), method=VAE.decode))
    assert recon.shape == (2, length, 12)


@pytest.mark.parametrize("levels,length", [(3, 128), (4, 64), (7, 128)])
def test_unet_shapes(levels, length):
    cfg = UNetConfig(num_levels=levels, latent_length=length, text_embed_dim=TEXT_DIM)
    out, variables = jax.eval_shape(lambda: ConditionalUNet(cfg).init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((3, length, 4)), jnp.zeros((3,), jnp.int32),
        jnp.zeros((3, TEXT_DIM + 3))))
    assert out.shape == (3, length, 4)
    kernel = variables["params"]["down_0"]["pre_shortcut_conv"]["kernel"]
    assert kernel.names == ("conv_window", "conv_in", "conv_out")
    assert kernel.value.shape == (7, 4, 6)  # (4 + 8) // 2 channels after the first conv
    with pytest.raises(ValueError, match="not divisible"):
        jax.eval_shape(lambda: ConditionalUNet(cfg).init(
            jax.random.PRNGKey(0), jnp.zeros((1, length + 2, 4)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, TEXT_DIM + 3))))



def test_unet_wide_input():
    cfg = UNetConfig(num_levels=4, latent_length=64, text_embed_dim=TEXT_DIM, base_channels=16)
    inputs = (jnp.zeros((2, 64, 4)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, TEXT_DIM + 3)))
    out, variables = jax.eval_shape(
        lambda: ConditionalUNet(cfg).init_with_output(jax.random.PRNGKey(0), *inputs))
    params = variables["params"]
    assert out.shape == (2, 64, 4)
    assert params["input_proj"]["kernel"].value.shape == (3, 4, 16)
    assert params["down_0"]["pre_shortcut_conv"]["kernel"].value.shape == (7, 16, 24)


def test_unet_scalar_condition_scale_is_applied():
    """Scaled raw (sex, age, hr) equal pre-scaled values fed to an unscaled model."""
    base = dict(num_levels=3, latent_length=32, text_embed_dim=TEXT_DIM)
    scaled = ConditionalUNet(UNetConfig(**base, scalar_condition_scale=(1.0, 0.01, 0.02)))
    plain = ConditionalUNet(UNetConfig(**base))
    latent = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 4))
    steps = jnp.array([10, 900])
    text = jax.random.normal(jax.random.PRNGKey(2), (2, TEXT_DIM))
    raw = jnp.concatenate([text, jnp.array([[1.0, 60.0, 50.0], [0.0, 30.0, 120.0]])], -1)
    pre = jnp.concatenate([text, jnp.array([[1.0, 0.6, 1.0], [0.0, 0.3, 2.4]])], -1)
    params = plain.init(jax.random.PRNGKey(0), latent, steps, raw)
    got = scaled.apply(params, latent, steps, raw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain.apply(params, latent, steps, pre)),
                               atol=1e-5)
    assert not np.allclose(np.asarray(got), np.asarray(plain.apply(params, latent, steps, raw)),
                           atol=1e-3)

def test_schedule_closed_form():
    linear = sch.make_schedule(1000, 0.00085, 0.012, "linear")
    scaled = sch.make_schedule(1000, 0.00085, 0.012, "scaled_linear")
    assert linear.betas[0] == pytest.approx(0.00085) and linear.betas[-1] == pytest.approx(0.012)
    assert linear.betas[500] == pytest.approx(0.00085 + 500 / 999 * (0.012 - 0.00085), rel=1e-6)
    mid = (0.00085 ** 0.5 + 500 / 999 * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2
    assert scaled.betas[500] == pytest.approx(mid, rel=1e-6)
    assert linear.alphas_cumprod[-1] == pytest.approx(np.prod(1 - np.linspace(0.00085, 0.012, 1000)),
                                                      rel=1e-4)
    scaled_betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert scaled.alphas_cumprod[-1] == pytest.approx(np.prod(1 - scaled_betas), rel=1e-4)

    x0, eps = jnp.full((1, 2, 1), 0.5), jnp.full((1, 2, 1), -1.0)
    t = jnp.array([600])
    a = float(linear.alphas_cumprod[600])
    noisy = sch.add_noise(linear, x0, eps, t)
    np.testing.assert_allclose(noisy, np.sqrt(a) * 0.5 - np.sqrt(1 - a), rtol=1e-6)
    # DDIM (eta 0) with the true eps lands exactly on q(x_prev | x0, eps).
    a_prev = float(linear.alphas_cumprod[580])
    prev = sch.ddim_step(linear, noisy, eps, t, t - 20, jnp.zeros_like(x0), eta=0.0)
    np.testing.assert_allclose(prev, np.sqrt(a_prev) * 0.5 - np.sqrt(1 - a_prev), rtol=1e-5)
    # Final DDIM step (prev < 0) returns x0.
    np.testing.assert_allclose(sch.ddim_step(linear, sch.add_noise(linear, x0, eps, jnp.array([5])),
                                             eps, jnp.array([5]), jnp.array([-15]), x0 * 0),
                               x0, rtol=1e-4)
    # DDPM posterior mean and variance (Ho et al. eq. 7) at t = 600, predicted eps = true eps.
    a_prev = float(linear.alphas_cumprod[599])
    b_t = 1 - a / a_prev
    mean = np.sqrt(a_prev) * b_t / (1 - a) * 0.5 + np.sqrt(1 - b_t) * (1 - a_prev) / (1 - a) * noisy
    var = (1 - a_prev) / (1 - a) * b_t
    step = sch.ddpm_step(linear, noisy, eps, t, jnp.ones_like(x0))
    np.testing.assert_allclose(step, mean + np.sqrt(var), rtol=1e-5)
    assert list(sch.sampling_timesteps(linear, "ddim", 4)) == [750, 500, 250, 0]


def test_v_prediction_round_trip():
    schedule = sch.make_schedule(prediction="v")
    x0, eps = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 8, 4))
    t = jnp.array([3, 900])
    v = sch.training_target(schedule, x0, eps, t)
    got_x0, got_eps = sch.split_prediction(schedule, sch.add_noise(schedule, x0, eps, t), v, t)
    np.testing.assert_allclose(got_x0, x0, atol=1e-5)
    np.testing.assert_allclose(got_eps, eps, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    config = load_config("configs/diffusion.py:tiny", [f"text.embed_dim={TEXT_DIM}"])
    unet = ConditionalUNet(UNetConfig.from_config(config.model.unet, config.diffusion.num_steps))
    vae = VAE(VAEConfig.from_config(config.model.vae))
    unet_params = init_params_on_host(unet, 0, jnp.zeros((1, 128, 4)), jnp.zeros((1,), jnp.int32),
                                      jnp.zeros((1, TEXT_DIM + 3)))
    # A non-trivial null condition, so guidance 0 differs from a zero condition.
    unet_params["params"]["null_condition"] = jnp.linspace(-1, 1, TEXT_DIM + 3)
    vae_params = init_params_on_host(vae, 1, jnp.zeros((1, 1024, 12)))
    return config, vae, vae_params, unet, unet_params


def test_guidance_zero_is_the_unconditional_model(tiny):
    config, vae, vae_params, unet, unet_params = tiny
    pipe = DiffusionPipeline.from_config(config, vae_params, unet_params)
    emb = np.random.default_rng(0).standard_normal((2, TEXT_DIM))
    cond_a = build_condition(emb, ["M", "F"], [60, 30], [110, 50])
    cond_b = build_condition(-emb, ["F", "F"], [20, 90], [50, 140])
    kw = dict(sampler="ddim", steps=3, seed=7)
    uncond_a = pipe.sample_latents(cond_a, guidance=0.0, **kw)
    np.testing.assert_allclose(uncond_a, pipe.sample_latents(cond_b, guidance=0.0, **kw), atol=1e-6)

    @jax.jit
    def null_only_sample(key):
        def null_only(x, t):
            return unet.apply(unet_params, x, t, jnp.zeros_like(jnp.asarray(cond_a)),
                              jnp.ones((2,), bool))
        return sch.sample(null_only, pipe.schedule, (2, 128, 4), key, "ddim", 3)
    np.testing.assert_allclose(uncond_a, null_only_sample(jax.random.PRNGKey(7)), atol=1e-5)

    @jax.jit
    def denoise_at_scales(x, t):
        return [guided_denoiser(unet, unet_params, jnp.asarray(cond_a), s)(x, t) for s in (1, 0, 2)]
    c, u, g = denoise_at_scales(jnp.ones((2, 128, 4)), jnp.array([500, 500]))
    assert np.abs(c - u).max() > 1e-3  # the condition matters at scale 1
    np.testing.assert_allclose(g, u + 2 * (c - u), atol=1e-4)  # scale 2 extrapolates


def test_sampling_defaults_to_the_config_guidance(tiny):
    config, vae, vae_params, unet, unet_params = tiny
    pipe = DiffusionPipeline.from_config(config, vae_params, unet_params)
    assert pipe.default_guidance == config.sample.guidance == 3.0
    cond = build_condition(np.ones((1, TEXT_DIM)), "F", 60, 110)
    kw = dict(sampler="ddim", steps=2, seed=1)
    default = pipe.sample_latents(cond, **kw)
    np.testing.assert_array_equal(default, pipe.sample_latents(cond, guidance=3.0, **kw))
    assert np.abs(default - pipe.sample_latents(cond, guidance=1.0, **kw)).max() > 1e-4


def test_generate_shapes_and_seed(tiny):
    config, vae, vae_params, unet, unet_params = tiny
    pipe = DiffusionPipeline.from_config(config, vae_params, unet_params)
    emb = np.ones(TEXT_DIM)
    ecg = pipe.generate(emb, "F", 60, 110, n=2, sampler="ddim", steps=2, seed=3)
    assert ecg.shape == (2, 12, 1024) and np.isfinite(ecg).all()
    again = pipe.generate(emb, "F", 60, 110, n=2, sampler="ddim", steps=2, seed=3)
    np.testing.assert_array_equal(ecg, again)
    assert np.abs(ecg[0] - ecg[1]).max() > 0  # different noise per sample
    at_500 = pipe.generate(emb, "F", 60, 110, n=1, sampler="ddim", steps=2, seed=3,
                           sample_rate=500)
    assert at_500.shape == (1, 12, 5000)


@pytest.mark.parametrize("kwargs,message", [
    (dict(age=-5), r"age must be in \[0, 120\], got -5"),
    (dict(age=130), r"age must be in"),
    (dict(text_embedding=None), r"text embedding is missing"),
    (dict(text_embedding=np.ones(TEXT_DIM + 1)), rf"width {TEXT_DIM + 1} does not match .* {TEXT_DIM}"),
    (dict(text_embedding=np.full(TEXT_DIM, np.nan)), r"NaN"),
    (dict(heart_rate=float("nan")), r"heart rate must be in"),
    (dict(sex="X"), r"sex must be M or F"),
])
def test_bad_conditioning_fails_clearly(kwargs, message):
    args = dict(text_embedding=np.ones(TEXT_DIM), sex="M", age=50, heart_rate=80)
    args.update(kwargs)
    with pytest.raises(ConditionError, match=message):
        build_condition(embed_dim=TEXT_DIM, **args)


def test_condition_layout_and_prompt():
    cond = build_condition(np.arange(3.0), "F", 61, 72.5)
    np.testing.assert_array_equal(cond, [[0, 1, 2, 0, 61, 72.5]])
    assert diffusets_prompt("Sinus rhythm|Normal ECG.") == (
        "Most importantly, the 1st diagnosis is {Sinus rhythm}."
        "As a supplementary condition, the 2nd diagnosis is {Normal ECG.}.")


def test_fixed_seed_loss_regression(tiny):
    """A few Adam steps of the tiny VAE and UNet on fixed synthetic data: exact loss values (of the
    loss itself: the tiny config's time-rotation augmentation, tested in test_rhythm, is off)."""
    from uniecg_jax.config import replace_values

    config, vae, vae_params, unet, unet_params = tiny
    config = replace_values(config, {"train.augment_roll": False})
    rng = np.random.default_rng(0)
    time = np.arange(1024) / 102.4
    ecg = np.stack([np.sin(2 * np.pi * 1.2 * time + lead) for lead in range(12)])[None]
    batch = {"ecg": jnp.asarray(np.repeat(ecg, 2, axis=0), jnp.float32),
             "text_embedding": jnp.asarray(rng.standard_normal((2, TEXT_DIM)), jnp.float32),
             "sex": jnp.array([1.0, 0.0]), "age": jnp.array([60.0, 30.0]),
             "hr": jnp.array([72.0, 72.0]),
             "rhythm": jnp.asarray(requested_rhythm([72.0, 72.0], 10.0, 1024, seed=0))}

    def run(loss_fn, params, steps, **kw):
        tx = optax.adam(1e-3)
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, key):
            (loss, _), grads = jax.value_and_grad(
                lambda p: loss_fn(p, batch, key, cfg=config, **kw), has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
        losses = []
        for i in range(steps):
            params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(i))
            losses.append(float(loss))
        return params, losses

    vae_params, vae_losses = run(vae_loss, vae_params, 3, model=vae)
    _, unet_losses = run(diffusion_loss, unet_params, 2, model=unet, vae=vae, vae_params=vae_params)
    assert vae_losses[-1] < vae_losses[0]
    np.testing.assert_allclose(vae_losses, VAE_LOSSES, rtol=2e-3)
    np.testing.assert_allclose(unet_losses, UNET_LOSSES, rtol=2e-3)


VAE_LOSSES = [11681.8115234375, 9982.6279296875, 8333.896484375]
UNET_LOSSES = [0.3644450902938843, 0.9322786331176758]


@pytest.mark.parametrize("width,factor", [(3, 2), (1, 2), (5, 2), (7, 3)])
def test_upsampled_conv_equals_torch_upsample_then_conv(width, factor):
    """`UpsampledConv1d` (polyphase, used by the VAE decoder's "up" + conv) equals torch's
    `nn.Upsample(nearest)` + `nn.Conv1d(padding=(k-1)//2)` with the same weights."""
    import torch

    from uniecg_jax.layers.conv import UpsampledConv1d

    rng = np.random.default_rng(width)
    x = rng.standard_normal((2, 9, 6)).astype(np.float32)
    conv = torch.nn.Conv1d(6, 5, width, padding=(width - 1) // 2)
    with torch.no_grad():
        expected = conv(torch.nn.Upsample(scale_factor=factor)(torch.tensor(x).transpose(1, 2)))
    params = {"params": {"kernel": conv.weight.detach().numpy().transpose(2, 1, 0),
                         "bias": conv.bias.detach().numpy()}}
    got = UpsampledConv1d(5, width, factor).apply(params, jnp.asarray(x))
    assert got.shape == (2, 9 * factor, 5)
    np.testing.assert_allclose(np.asarray(got), expected.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("shape,groups", [((2, 40, 16), 4), ((2, 40, 16), 1), ((2, 5, 6, 8), 2)])
def test_group_norm_equals_torch(shape, groups):
    """`GroupNorm` (VAE, UNet, ECG-CLIP; channels-last, per-position sums first) equals
    `torch.nn.GroupNorm` on channels-first input, with a non-zero mean and non-trivial affine."""
    import torch

    from uniecg_jax.layers.norms import GroupNorm, channel_moments

    rng = np.random.default_rng(len(shape) + groups)
    x = (rng.standard_normal(shape) * 3 + rng.standard_normal(shape[-1]) * 5).astype(np.float32)
    scale, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    norm = torch.nn.GroupNorm(groups, shape[-1])
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(scale))
        norm.bias.copy_(torch.tensor(bias))
        expected = norm(torch.tensor(np.moveaxis(x, -1, 1))).numpy()
    variables = {"params": {"scale": scale, "bias": bias}}
    got = GroupNorm(groups).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), np.moveaxis(expected, 1, -1), atol=2e-5)
    # The same norm from moments a producer summed (the channels combined into their groups),
    # and folded into per-sample channel maps for a consumer that applies it as it reads x.
    moments = channel_moments(jnp.asarray(x))
    from_moments = GroupNorm(groups).apply(variables, jnp.asarray(x), moments=moments)
    np.testing.assert_allclose(np.asarray(from_moments), np.moveaxis(expected, 1, -1), atol=2e-5)
    scale_map, shift_map = GroupNorm(groups).apply(variables, jnp.asarray(x), as_affine=True)
    assert scale_map.shape == shift_map.shape == (shape[0], shape[-1])
    middle = (slice(None),) + (None,) * (len(shape) - 2)
    folded = x * np.asarray(scale_map)[middle] + np.asarray(shift_map)[middle]
    np.testing.assert_allclose(folded, np.moveaxis(expected, 1, -1), atol=5e-5)
