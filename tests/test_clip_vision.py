"""CLIP vision tower (models/clip_vision.py) against transformers' `CLIPVisionModel`: import from a
tiny random HF model, the selected hidden states equal to 1e-4, export back to `from_pretrained`
with equal key sets; GEM/LLaVA prefixes; CLIP preprocessing against `CLIPImageProcessor`'s PIL
backend to 1e-5; logical axis names, freezing, and a sharded forward equal to one device."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniecg_jax import sharding
from uniecg_jax.convert import hf_clip
from uniecg_jax.data.image_preprocess import clip_preprocess, expand_to_square
from uniecg_jax.errors import CheckpointError
from uniecg_jax.layers.params import init_params_on_host
from uniecg_jax.models.clip_vision import (FROZEN_VISION_TOWER, ClipVisionConfig,
                                           ClipVisionTower, vision_config_dict)
from uniecg_jax.train import optim

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_HF = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               image_size=42, patch_size=14, layer_norm_eps=1e-5)


def tiny_hf_vision_model(directory=None, seed=0):
    """A random float32 `CLIPVisionModel` (norms and biases randomised too), saved if asked."""
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_HF)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    if directory is not None:
        model.save_pretrained(str(directory))
    return model


def hf_features(model, pixels_nhwc: np.ndarray, select_layer: int, select_feature: str):
    """LLaVA's `CLIPVisionTower.feature_select` on transformers' hidden states."""
    with torch.no_grad():
        out = model(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy()),
                    output_hidden_states=True)
    hidden = out.hidden_states[select_layer].numpy()
    return hidden[:, 1:] if select_feature == "patch" else hidden


def ours(params, config, pixels):
    return np.asarray(ClipVisionTower(config).apply({"params": params}, jnp.asarray(pixels)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_vision")
    model = tiny_hf_vision_model(directory)
    return directory, model


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, 42, 42, 3)).astype(np.float32)


@pytest.mark.parametrize("select_layer,select_feature", [(-2, "patch"), (-1, "cls_patch"),
                                                         (0, "patch")])
def test_selected_hidden_states_match_transformers(hf_dir, pixels, select_layer, select_feature):
    directory, model = hf_dir
    config = hf_clip.vision_config_from_hf(directory, select_layer=select_layer,
                                           select_feature=select_feature)
    assert (config.num_layers, config.hidden_size, config.image_size) == (3, 32, 42)
    params = hf_clip.load_clip_vision(directory, config)
    got = ours(params, config, pixels)
    want = hf_features(model, pixels, select_layer, select_feature)
    assert got.shape == want.shape == (2, config.num_tokens, 32)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    if select_layer != 0:     # the layers matter: another select layer gives other features
        other = hf_features(model, pixels, 0, select_feature)
        assert np.abs(other - got).max() > 1e-2


def test_export_round_trip_through_from_pretrained(hf_dir, pixels, tmp_path):
    directory, model = hf_dir
    config = hf_clip.vision_config_from_hf(directory)
    params = hf_clip.load_clip_vision(directory, config)
    out = hf_clip.save_clip_vision_hf(params, config, str(tmp_path / "export"))
    reloaded, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    exported = {name[len(hf_clip.HF_PREFIX):] for name, _ in
                hf_clip.clip_vision_state_dict(params, config)}
    assert exported == set(model.state_dict()) == set(reloaded.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    np.testing.assert_allclose(hf_features(reloaded.eval(), pixels, -2, "patch"),
                               hf_features(model, pixels, -2, "patch"), atol=0, rtol=0)
    processor = transformers.CLIPImageProcessorPil.from_pretrained(out)
    assert processor.crop_size["height"] == config.image_size
    assert list(processor.image_mean) == pytest.approx(hf_clip.CLIP_MEAN)


def test_clip_model_and_gem_release_layouts(hf_dir, tmp_path):
    directory, model = hf_dir
    config = hf_clip.vision_config_from_hf(directory)
    reference = hf_clip.load_clip_vision(directory, config)
    vision_state = {k: v for k, v in model.state_dict().items()}
    # A CLIPModel: vision tensors under `vision_model.`, text tower and projections ignored.
    clip_state = {"vision_model." + k: v for k, v in vision_state.items()}
    clip_state.update({"text_model.embeddings.token_embedding.weight": torch.zeros(9, 32),
                       "visual_projection.weight": torch.zeros(16, 32),
                       "logit_scale": torch.tensor(2.6),
                       "vision_model.embeddings.position_ids": torch.arange(10)[None]})
    # A GEM release: the tower inside LlavaLlamaForCausalLM, next to the LLM and projectors.
    gem_state = {hf_clip.GEM_PREFIX + k: v for k, v in vision_state.items()}
    gem_state.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4),
                      "model.mm_projector.0.weight": torch.zeros(8, 32),
                      "model.ecg_tower.ecg_tower.conv1.weight": torch.zeros(4, 12, 50)})
    for state, prefix in ((clip_state, "vision_model."), (gem_state, hf_clip.GEM_PREFIX)):
        assert hf_clip.detect_prefix(state) == prefix
        params = hf_clip.load_clip_vision(state, config)
        jax.tree.map(np.testing.assert_array_equal, params, reference)
        assert hf_clip.load_clip_vision(state, config, prefix=prefix) is not None
    clip_config = {"model_type": "clip", "text_config": {"hidden_size": 8},
                   "vision_config": dict(TINY_HF, model_type="clip_vision_model",
                                         hidden_act="quick_gelu")}
    assert hf_clip.vision_config_from_hf(clip_config) == config
    gem_config = {"model_type": "llava_llama", "mm_vision_tower":
                  "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
                  "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
    vit_l = hf_clip.vision_config_from_hf(gem_config)
    assert (vit_l.image_size, vit_l.patch_size, vit_l.hidden_size, vit_l.num_layers,
            vit_l.num_heads, vit_l.intermediate_size) == (336, 14, 1024, 24, 16, 4096)
    assert (vit_l.select_layer, vit_l.image_aspect_ratio, vit_l.num_tokens) == (-2, "pad", 576)
    assert vit_l == ClipVisionConfig.from_config(vision_config_dict("vit_l14_336")).replace(
        image_aspect_ratio="pad")


def test_import_places_leaves_on_their_shardings(hf_dir, pixels):
    directory, model = hf_dir
    config = hf_clip.vision_config_from_hf(directory)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    abstract = sharding.abstract_sharded_params(ClipVisionTower(config), mesh, pixels[:1])
    params = hf_clip.load_clip_vision(directory, config, abstract=abstract)
    fc1 = params["layers_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding == abstract["layers_0"]["mlp"]["fc1"]["kernel"].sharding
    assert not fc1.sharding.is_fully_replicated
    np.testing.assert_allclose(ours(params, config, pixels),
                               hf_features(model, pixels, -2, "patch"), atol=1e-4, rtol=1e-4)


def test_bad_checkpoints_name_the_tensor(hf_dir):
    directory, model = hf_dir
    config = hf_clip.vision_config_from_hf(directory)
    state = {"vision_model." + k: v for k, v in model.state_dict().items()}
    wide = config.replace(hidden_size=64, num_heads=4)
    with pytest.raises(CheckpointError,
                       match=r"vision_model\.embeddings\.class_embedding has shape"):
        hf_clip.load_clip_vision(state, wide)
    with pytest.raises(CheckpointError, match=r"missing tensors .*encoder\.layers\.3"):
        hf_clip.load_clip_vision(state, config.replace(num_layers=4))
    with pytest.raises(CheckpointError, match=r"no place for: .*encoder\.layers\.2"):
        hf_clip.load_clip_vision(state, config.replace(num_layers=2, select_layer=-1))
    with pytest.raises(CheckpointError, match="no CLIP vision tower"):
        hf_clip.load_clip_vision({"model.layers.0.weight": np.zeros(2)}, config)
    with pytest.raises(CheckpointError, match="gelu"):
        hf_clip.vision_config_from_hf({"model_type": "clip_vision_model", "hidden_act": "gelu"})


def test_preprocessing_matches_clip_image_processor():
    rng = np.random.default_rng(1)
    # Smooth + noisy content so bicubic overshoot and rounding are exercised; wide, tall, small.
    images = []
    for height, width in ((170, 220), (260, 120), (30, 44), (50, 50)):
        yy, xx = np.mgrid[0:height, 0:width]
        base = 127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]
        image = base + rng.normal(0, 25, (height, width, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 42},
                                                   crop_size={"height": 42, "width": 42})
    for image in images:
        want = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = clip_preprocess(image, 42, "ori")
        assert got.dtype == np.float32 and got.shape == (42, 42, 3)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        # LLaVA's `pad`: expand2square with int(mean * 255), then the same processor.
        from PIL import Image
        width, height = image.shape[1], image.shape[0]
        side = max(width, height)
        square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in processor.image_mean))
        square.paste(Image.fromarray(image), ((side - width) // 2, (side - height) // 2))
        np.testing.assert_array_equal(expand_to_square(image), np.asarray(square))
        want_pad = processor(images=square, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(clip_preprocess(image, 42, "pad"), want_pad.transpose(1, 2, 0),
                                   atol=1e-5, rtol=0)


def test_logical_names_freezing_and_config_checks():
    config = ClipVisionConfig.from_config(vision_config_dict("tiny"))
    tower = ClipVisionTower(config)
    pixels = jnp.zeros((1, config.image_size, config.image_size, 3))
    boxed = jax.eval_shape(tower.init, jax.random.PRNGKey(0), pixels)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(leaf, "names") and len(leaf.names) == leaf.value.ndim
                          for leaf in leaves)
    params = init_params_on_host(tower, 0, pixels)["params"]
    assert "post_layernorm" in params and f"layers_{config.num_layers - 1}" in params
    labels = optim.freeze_labels({"vision_tower": params, "projector": {"kernel": jnp.zeros(2)}},
                                 FROZEN_VISION_TOWER)
    assert set(jax.tree.leaves(labels["vision_tower"])) == {optim.FROZEN}
    assert labels["projector"]["kernel"] == "trainable"
    # Frozen (GEM): no gradient reaches the tower; trainable: it does.
    for frozen in (True, False):
        model = ClipVisionTower(config.replace(frozen=frozen))
        grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, pixels + 1.0).sum()))(params)
        norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads))
        assert (norm == 0.0) == frozen
    with pytest.raises(ValueError, match="select_layer"):
        config.replace(select_layer=-5)
    with pytest.raises(ValueError, match="select_feature"):
        config.replace(select_feature="cls")
    with pytest.raises(ValueError, match="channels last"):
        tower.apply({"params": params}, jnp.zeros((1, 3, 56, 56)))


def test_sharded_forward_equals_one_device():
    config = ClipVisionConfig.from_config(vision_config_dict("tiny")).replace(frozen=False)
    tower = ClipVisionTower(config)
    pixels = jax.random.normal(jax.random.PRNGKey(1), (8, config.image_size, config.image_size, 3))
    params = init_params_on_host(tower, 0, pixels[:1])["params"]
    want = tower.apply({"params": params}, pixels)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = sharding.abstract_sharded_params(tower, mesh, pixels[:1])
    placed = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)
    with sharding.mesh_context(mesh):
        got = jax.jit(lambda p, x: tower.apply({"params": p}, x))(
            placed, jax.device_put(pixels, sharding.data_sharding(mesh, 4)))
    assert any(len(leaf.sharding.device_set) > 1 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(placed))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert json.dumps(config.to_dict())       # the config group serialises (config.json)
