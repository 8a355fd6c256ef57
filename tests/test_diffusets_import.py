"""DiffuSETS PyTorch state dicts -> Flax VAE / UNet: same outputs (<= 1e-4, float32), round trip.

The PyTorch side is `tests/diffusets_torch_reference.py` (DiffuSETS's key names and layouts) with
random weights, norms included, so every tensor's mapping is exercised.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusets_torch_reference import ECGconditional, decode, encode, vae_decoder, vae_encoder
from uniecg_jax.convert import diffusets
from uniecg_jax.errors import CheckpointError
from uniecg_jax.models.unet import ConditionalUNet, UNetConfig
from uniecg_jax.models.vae import VAE, VAEConfig

TEXT_DIM = 24


def _randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not name.endswith("embeddings"):
                fan_in = int(np.prod(tensor.shape[1:])) if tensor.ndim > 1 else 4
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / np.sqrt(fan_in))


@pytest.fixture(scope="module")
def torch_unet():
    torch.manual_seed(0)
    model = ECGconditional(steps=1000, kernel_size=7, num_levels=7, n_channels=4,
                           text_embed_dim=TEXT_DIM).eval()
    _randomize(model, 1)
    return model


UNET_CFG = UNetConfig(text_embed_dim=TEXT_DIM)  # DiffuSETS's released shape: 7 levels, kernel 7


def _unet_inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((batch, 4, 128)).astype(np.float32)
    timesteps = np.array([999, 17][:batch])
    text = rng.standard_normal((batch, 1, TEXT_DIM)).astype(np.float32)
    scalars = {"gender": np.array([1.0, 0.0][:batch]), "age": np.array([63.0, 28.0][:batch]),
               "heart rate": np.array([110.0, 54.0][:batch])}
    return latent, timesteps, text, scalars


def _torch_unet_out(model, latent, timesteps, text, scalars):
    cond = {k: torch.tensor(v, dtype=torch.float32)[:, None, None] for k, v in scalars.items()}
    with torch.no_grad():
        return model(torch.tensor(latent), torch.tensor(timesteps), torch.tensor(text), cond).numpy()


def _flax_unet_out(variables, latent, timesteps, text, scalars):
    condition = np.concatenate([text[:, 0]] + [v[:, None] for v in scalars.values()], axis=-1)
    out = jax.jit(ConditionalUNet(UNET_CFG).apply)(
        variables, jnp.asarray(latent.transpose(0, 2, 1)), jnp.asarray(timesteps),
        jnp.asarray(condition, jnp.float32))
    return np.asarray(out).transpose(0, 2, 1)


def test_unet_import_matches_reference_forward_and_round_trips(torch_unet):
    inputs = _unet_inputs()
    expected = _torch_unet_out(torch_unet, *inputs)
    variables = diffusets.unet_from_torch(torch_unet.state_dict(), UNET_CFG)
    got = _flax_unet_out(variables, *inputs)
    assert got.shape == (2, 4, 128)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    exported = diffusets.unet_to_torch(variables, UNET_CFG)
    reference = torch_unet.state_dict()
    assert set(exported) == set(reference)
    for key, tensor in reference.items():
        if ".block.down." not in key:  # unused by DiffuSETS's forward; exported as zeros
            np.testing.assert_allclose(exported[key], tensor.numpy(), atol=1e-4, err_msg=key)
    fresh = ECGconditional(text_embed_dim=TEXT_DIM).eval()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
    np.testing.assert_allclose(_torch_unet_out(fresh, *inputs), expected, atol=1e-5)


def test_unet_import_errors_name_the_tensor(torch_unet):
    state = dict(torch_unet.state_dict())
    with pytest.raises(CheckpointError, match=r"value_combiner\.weight.*text_embed_dim"):
        diffusets.unet_from_torch(state, UNetConfig(text_embed_dim=TEXT_DIM + 1))
    del state["bottelneck.bottleneck_conv2.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'bottelneck\.bottleneck_conv2\.weight'"):
        diffusets.unet_from_torch(state, UNET_CFG)
    state = dict(torch_unet.state_dict(), **{"extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['extra\.weight'\]"):
        diffusets.unet_from_torch(state, UNET_CFG)


# Both conv algorithms hold 1e-4 against torch: measured max |error| on the reconstruction (max
# |recon| 1.5) 2.7e-6 direct, 2.8e-6 Winograd; on the posterior mean 1.4e-6 and 1.5e-6.
@pytest.mark.parametrize("widths,groups", [((32, 64, 128), 8)])
@pytest.mark.parametrize("conv_algorithm", ["direct", "winograd"])
def test_vae_import_matches_reference_encode_decode(widths, groups, conv_algorithm):
    torch.manual_seed(0)
    encoder = vae_encoder(widths, groups).eval()
    decoder = vae_decoder(widths, groups).eval()
    _randomize(encoder, 2)
    _randomize(decoder, 3)
    rng = np.random.default_rng(0)
    ecg = rng.standard_normal((2, 1024, 12)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 128)).astype(np.float32)
    with torch.no_grad():
        z, mean, log_var = encode(encoder, torch.tensor(ecg), torch.tensor(noise))
        recon = decode(decoder, z.clone()).numpy()

    cfg = VAEConfig(widths=widths, num_groups=groups, conv_algorithm=conv_algorithm)
    checkpoint = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    variables = diffusets.vae_from_torch(checkpoint, cfg)
    model = VAE(cfg)
    got_z, got_mean, got_log_var = jax.jit(lambda v, x, n: model.apply(v, x, n, method=VAE.encode))(
        variables, jnp.asarray(ecg), jnp.asarray(noise.transpose(0, 2, 1)))
    np.testing.assert_allclose(np.asarray(got_mean).transpose(0, 2, 1), mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_log_var).transpose(0, 2, 1), log_var.numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_z).transpose(0, 2, 1), z.numpy(), atol=1e-4)
    got_recon = jax.jit(lambda v, z: model.apply(v, z, method=VAE.decode))(
        variables, jnp.asarray(z.numpy().transpose(0, 2, 1)))
    np.testing.assert_allclose(np.asarray(got_recon), recon, atol=1e-4)

    exported = diffusets.vae_to_torch(variables, cfg)
    for part, module in (("encoder", encoder), ("decoder", decoder)):
        reference = module.state_dict()
        assert set(exported[part]) == set(reference)
        for key, tensor in reference.items():
            if ".groupnorm." not in key:
                np.testing.assert_allclose(exported[part][key], tensor.numpy(), atol=1e-6)
    decoder_only = diffusets.vae_from_torch({"decoder": decoder.state_dict()}, cfg)
    assert set(decoder_only["params"]) == {"decoder"}


def test_vae_import_rejects_wrong_width():
    decoder = vae_decoder((32, 64, 128), 8)
    with pytest.raises(CheckpointError, match=r"vae: tensor 'decoder\.\d+\.[a-z_0-9.]+' has shape"):
        diffusets.vae_from_torch({"decoder": decoder.state_dict()},
                                 VAEConfig(widths=(32, 64, 256), num_groups=8))
