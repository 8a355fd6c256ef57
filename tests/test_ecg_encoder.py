"""ECG patch encoder shapes, logical axes, and the ECG-CoCa importer against a PyTorch reference."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ecg_coca_torch_reference import EcgTower, GemProjectors
from uniecg_jax.convert import ecg_coca
from uniecg_jax.errors import CheckpointError
from uniecg_jax.models import ecg_encoder as E

ALLOWED_PARAM_AXES = {"vocab", "embed", "mlp", "q_heads", "kv_heads", "head_dim", "norm", "layers",
                      "conv_window", "conv_in", "conv_out", None}

# Small but not degenerate: 3 layers, 4 heads of 8, 10 patches of 25 samples.
SMALL = E.ECGEncoderConfig(width=32, layers=3, heads=4, patch_size=25, num_samples=250)
SMALL_PROJ = E.ProjectorConfig(ecg_proj_dim=24, llm_hidden_size=40, ecg_width=32)


@pytest.mark.parametrize("cfg, tokens", [
    (E.ECGEncoderConfig.from_config(E.encoder_config_dict("tiny")), 101),
    (SMALL, 11),
    (E.ECGEncoderConfig(width=48, layers=1, heads=3, patch_size=10, num_samples=1000,
                        num_leads=8), 101),
])
def test_encoder_and_tower_shapes(cfg, tokens):
    proj = E.ProjectorConfig(ecg_proj_dim=16, llm_hidden_size=24, ecg_width=cfg.width)
    tower = E.ECGTower(cfg, proj)
    ecg = jnp.ones((2, cfg.num_leads, cfg.num_samples))
    variables = tower.init(jax.random.key(0), ecg)
    assert cfg.num_tokens == tokens
    assert tower.apply(variables, ecg, method="encode").shape == (2, tokens, cfg.width)
    out = tower.apply(variables, ecg)
    assert out.shape == (2, tokens, 24) and bool(jnp.all(jnp.isfinite(out)))


def test_full_size_abstract_shapes():
    """ECG-CoCa full size: 12 x 5000 -> 101 tokens x 768; GEM projectors -> 1024 -> LLM width."""
    model_cfg = {"ecg_encoder": E.encoder_config_dict("full"),
                 "projector": E.projector_config_dict(llm_hidden_size=4096)}
    tower = E.build_tower(model_cfg)
    ecg = jax.ShapeDtypeStruct((2, 12, 5000), jnp.float32)
    variables = jax.eval_shape(tower.init, jax.random.key(0), ecg)
    assert jax.eval_shape(lambda v, x: tower.apply(v, x, method="encode"), variables, ecg).shape \
        == (2, 101, 768)
    assert jax.eval_shape(tower.apply, variables, ecg).shape == (2, 101, 4096)
    params = nn.unbox(variables["params"])
    encoder_count = sum(np.prod(x.shape) for x in jax.tree.leaves(params["encoder"]))
    # Hand count: 12 blocks x (12 * 768^2 weights + 13 * 768 biases/norms) = 85,054,464
    # + conv1 768*12*50 + class 768 + positions 101*768 + ln_pre 2*768 = 85,595,136.
    assert encoder_count == 12 * (12 * 768**2 + 13 * 768) + 768 * 12 * 50 + 768 + 101 * 768 + 1536
    assert encoder_count == 85_595_136
    assert params["projector"]["ecg_projector"]["kernel"].shape == (768, 1024)
    assert params["projector"]["mm_projector"]["fc_1"]["kernel"].shape == (4096, 4096)


def test_every_param_has_allowed_logical_axes():
    tower = E.ECGTower(SMALL, SMALL_PROJ)
    variables = jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, 12, 250)))
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    for leaf in boxed:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= ALLOWED_PARAM_AXES


def test_bad_input_shape_is_named():
    tower = E.ECGEncoder(SMALL)
    with pytest.raises(ValueError, match=r"\[batch, 12 leads, 250 samples\].*\(1, 250, 12\)"):
        tower.init(jax.random.key(0), jnp.zeros((1, 250, 12)))


def _torch_reference(seed=0):
    torch.manual_seed(seed)
    tower = EcgTower(SMALL.num_samples, SMALL.num_leads, SMALL.patch_size, SMALL.width,
                     SMALL.layers, SMALL.heads).eval()
    proj = GemProjectors(SMALL.width, SMALL_PROJ.ecg_proj_dim, SMALL_PROJ.llm_hidden_size).eval()
    # Non-trivial LayerNorm affine params so a scale/bias mix-up cannot pass.
    with torch.no_grad():
        for module in tower.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
            if isinstance(module, torch.nn.MultiheadAttention):
                module.in_proj_bias.normal_(0, 0.1)
    state = {f"module.ecg.{k}": v for k, v in tower.state_dict().items()}
    state.update({f"model.{k}": v for k, v in proj.state_dict().items()})
    return tower, proj, state


def test_import_matches_torch_and_round_trips(tmp_path):
    tower_t, proj_t, state = _torch_reference()
    ecg = torch.randn(3, 12, 250)
    with torch.no_grad():
        want_tokens = tower_t(ecg).numpy()
        want_llm = proj_t(tower_t(ecg)).numpy()

    path = tmp_path / "ecg_coca.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    result = ecg_coca.import_ecg_coca(path, SMALL, SMALL_PROJ)
    assert result.tower_prefix == "module.ecg." and result.projector_prefix == "model."
    assert result.skipped == ["module.ecg.ln_post.bias", "module.ecg.ln_post.weight",
                              "module.ecg.proj"]

    model = E.ECGTower(SMALL, SMALL_PROJ)
    got_tokens = model.apply({"params": result.params}, jnp.asarray(ecg.numpy()), method="encode")
    got_llm = model.apply({"params": result.params}, jnp.asarray(ecg.numpy()))
    np.testing.assert_allclose(np.asarray(got_tokens), want_tokens, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(got_llm), want_llm, atol=1e-4, rtol=0)
    assert np.abs(want_tokens).max() > 0.5  # the comparison is not between near-zero tensors

    exported = ecg_coca.export_ecg_coca(result.params, SMALL, SMALL_PROJ)
    assert set(exported) == set(state) - set(result.skipped)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)

    # Exported file loads back into the torch modules (strict except the skipped tower keys).
    out_path = tmp_path / "exported.safetensors"
    ecg_coca.save_state_dict(exported, out_path)
    reread = ecg_coca.import_ecg_coca(out_path, SMALL, SMALL_PROJ)
    for a, b in zip(jax.tree.leaves(reread.params), jax.tree.leaves(result.params)):
        np.testing.assert_array_equal(a, b)
    fresh = EcgTower(SMALL.num_samples, 12, SMALL.patch_size, SMALL.width, SMALL.layers,
                     SMALL.heads)
    missing, unexpected = fresh.load_state_dict(
        {k[len("module.ecg."):]: torch.from_numpy(v) for k, v in exported.items()
         if k.startswith("module.ecg.")}, strict=False)
    assert sorted(missing) == ["ln_post.bias", "ln_post.weight", "proj"] and not unexpected


def test_import_other_prefixes_and_tower_only():
    tower_t, _, _ = _torch_reference(seed=1)
    gem_keys = {f"model.ecg_tower.ecg_tower.{k}": v for k, v in tower_t.state_dict().items()}
    gem_keys["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)  # LLM keys are ignored
    result = ecg_coca.import_ecg_coca(gem_keys, SMALL, SMALL_PROJ)
    assert result.tower_prefix == "model.ecg_tower.ecg_tower."
    assert result.projector_prefix is None and set(result.params) == {"encoder"}
    plain = ecg_coca.import_ecg_coca({f"visual.{k}": v for k, v in tower_t.state_dict().items()},
                                     SMALL)
    assert plain.tower_prefix == "visual."
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(result.params)):
        np.testing.assert_array_equal(a, b)


def test_wrong_shape_names_the_tensor(tmp_path):
    _, _, state = _torch_reference()
    bad = dict(state)
    bad["module.ecg.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(64, 32)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*resblocks\.1\.mlp\.c_fc\.weight.*"
                                              r"\(64, 32\).*\(128, 32\)"):
        ecg_coca.import_ecg_coca(path, SMALL, SMALL_PROJ)
    # A config that disagrees with the checkpoint (wider model) names the first mismatching tensor.
    wider = dataclasses.replace(SMALL, width=64)
    with pytest.raises(CheckpointError, match=r"conv1\.weight.*\(32, 12, 25\).*\(64, 12, 25\)"):
        ecg_coca.import_ecg_coca(state, wider)


def test_missing_and_unexpected_keys(tmp_path):
    _, _, state = _torch_reference()
    missing = {k: v for k, v in state.items() if "resblocks.2.attn.in_proj_bias" not in k}
    with pytest.raises(CheckpointError, match=r"missing tensor 'module\.ecg\.transformer\."
                                              r"resblocks\.2\.attn\.in_proj_bias'"):
        ecg_coca.import_ecg_coca(missing, SMALL)
    shallow = dataclasses.replace(SMALL, layers=2)
    with pytest.raises(CheckpointError, match=r"unexpected tower tensors.*resblocks\.2"):
        ecg_coca.import_ecg_coca(state, shallow)
    assert ecg_coca.import_ecg_coca(state, shallow, strict=False).skipped
    with pytest.raises(CheckpointError, match="no ECG tower found"):
        ecg_coca.import_ecg_coca({"foo.weight": torch.zeros(1)}, SMALL)
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint file not found"):
        ecg_coca.import_ecg_coca(tmp_path / "nope.pt", SMALL)


def test_bf16_compute_close_to_f32():
    cfg16 = dataclasses.replace(SMALL, dtype="bfloat16")
    ecg = jax.random.normal(jax.random.key(1), (2, 12, 250))
    params = E.ECGEncoder(SMALL).init(jax.random.key(0), ecg)
    f32 = E.ECGEncoder(SMALL).apply(params, ecg)
    bf16 = E.ECGEncoder(cfg16).apply(params, ecg)
    assert bf16.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - f32)))
    assert 0 < err < 0.1
