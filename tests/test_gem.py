"""GEM releases: one-step import, LLaVA's llava_v1 token ids and mask, the encoder's lead order, and
the round trip back to GEM's layout.

References: the whole GEM model in torch (a `transformers` LlamaForCausalLM, our torch ECG-CoCa tower
and GEM's projectors from tests/ecg_coca_torch_reference.py, a `transformers` CLIPVisionModel read
as `CLIPVisionTower.feature_select` reads it, spliced as GEM's `prepare_inputs_labels_for_multimodal`
splices at lanxiang1017/GEM commit c8a580f, llava/model/llava_arch.py: `encode_ecgs` = mm_projector(
ecg_projector(tower)), `encode_images` = mm_projector(CLIP features), `multimodal_features =
torch.cat([ecg_features, image_features], dim=1)`, the embeddings split at the -200 placeholder and
the multimodal features concatenated in its place), and LLaVA's prompt code re-written here from
llava/conversation.py (`conv_llava_v1`, SeparatorStyle.TWO `get_prompt`), llava/mm_utils.py
(`tokenizer_image_token`) and llava/train/train.py (`preprocess_multimodal`, `preprocess_v1`) at
lanxiang1017/GEM commit c8a580f.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ecg_coca_torch_reference import EcgTower, GemProjectors
from test_clip_vision import TINY_HF, hf_features, tiny_hf_vision_model
from test_export_sharded import WORKER_PREAMBLE, run_two_processes
from uniecg_jax import sharding
from uniecg_jax.cli import main as cli_main
from uniecg_jax.config import load_config
from uniecg_jax.convert import gem, hf_clip, hf_testing
from uniecg_jax.data import record as record_lib
from uniecg_jax.data.chat_format import LLAVA_V1, VICUNA, InputBuilder
from uniecg_jax.data import read_record
from uniecg_jax.errors import CheckpointError
from uniecg_jax.inference.interpret import Interpreter
from uniecg_jax.models.stage1 import UniECG, UniECGConfig
from uniecg_jax.train import build_task

# heads = width // 64 = 2, as open_clip derives them; 11 ECG tokens. The CLIP tower (test_clip_vision's
# tiny one: 42 px / patch 14 = 9 patch tokens, 3 layers) is mm_hidden_size wide, as GEM's ViT-L is.
WIDTH, LAYERS, PATCH, SAMPLES = 128, 2, 50, 500
MM_HIDDEN = TINY_HF["hidden_size"]
IMAGE_TOKENS = (TINY_HF["image_size"] // TINY_HF["patch_size"]) ** 2
SENTINEL = -200
CLIP_NAME = hf_clip.GEM_PREFIX + "{}"  # as LLaVA's trainer saves the tower (transformers 4 names)


def _gem_state(seed: int = 0, samples: int = SAMPLES, layers: int = LAYERS):
    """(torch LLM, tower, projectors, CLIP vision model, {GEM tensor name: np.ndarray}) with random
    weights."""
    llm = hf_testing.tiny_hf_model("llama", seed=seed)
    torch.manual_seed(seed + 1)
    tower = EcgTower(samples, 12, PATCH, WIDTH, layers, heads=WIDTH // 64).eval()
    projectors = GemProjectors(WIDTH, MM_HIDDEN, llm.config.hidden_size).eval()
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "ln" in name:
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("weight") else 0))
    state = {name: t.detach().numpy().copy() for name, t in llm.state_dict().items()}
    state.update({gem.TOWER_PREFIX + k: v.detach().numpy().copy()
                  for k, v in tower.state_dict().items()})
    state.update({"model." + k: v.detach().numpy().copy()
                  for k, v in projectors.state_dict().items()})
    clip = tiny_hf_vision_model(seed=seed + 2)
    state.update({CLIP_NAME.format(k): v.detach().numpy().copy()
                  for k, v in clip.state_dict().items()})
    return llm, tower, projectors, clip, state


def _gem_config(llm, mm_ecg_tower: str, mm_vision_tower: str) -> dict:
    """GEM's config.json; `mm_vision_tower` a local CLIP directory, as LLaVA's build_vision_tower
    accepts (GEM's own release names openai/clip-vit-large-patch14-336)."""
    config = llm.config.to_dict()
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
                  mm_ecg_tower=mm_ecg_tower, open_clip_config="coca_ViT-B-32",
                  ecg_projector_type="linear", mm_vision_tower=mm_vision_tower,
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=MM_HIDDEN,
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  image_aspect_ratio="ori", mm_patch_merge_type="flat",
                  mm_use_im_start_end=False, use_mm_proj=True)
    return config


def write_release(directory, state: dict, config: dict, shards: int = 3) -> str:
    """GEM's save layout: config.json + `shards` safetensors files with an index (or one
    model.safetensors)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(state)
    if shards == 1:
        save_file({k: state[k] for k in names}, os.path.join(directory, "model.safetensors"))
        return str(directory)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[index::shards]}
        save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return str(directory)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    llm, tower, projectors, clip, state = _gem_state()
    clip_dir = tmp_path_factory.mktemp("openai_clip")
    clip.save_pretrained(str(clip_dir))
    directory = tmp_path_factory.mktemp("gem_release")
    write_release(directory, state, _gem_config(llm, "/nonexistent/ecg_coca.pt", str(clip_dir)))
    hf_testing.tiny_tokenizer(directory, vocab_size=96)
    return dict(dir=str(directory), llm=llm, tower=tower, projectors=projectors, clip=clip,
                clip_dir=str(clip_dir), state=state)


def torch_gem_logits(release, ids: list[int], ecg: np.ndarray | None,
                     image: np.ndarray | None = None) -> np.ndarray:
    """GEM's forward (llava_arch.py at c8a580f): ECG features = mm_projector(ecg_projector(
    tower(ecg))), image features = mm_projector(CLIP hidden state mm_vision_select_layer, patches),
    `torch.cat([ecg_features, image_features], dim=1)` spliced where the -200 placeholder stands,
    then the Llama. `ecg` / `image` None: that block left out (the sequence our model sees with
    the block absent)."""
    llm, projectors = release["llm"], release["projectors"]
    position = ids.index(SENTINEL)
    with torch.no_grad():
        blocks = []
        if ecg is not None:
            blocks.append(projectors(release["tower"](torch.from_numpy(ecg))))
        if image is not None:
            clip_features = hf_features(release["clip"], image, -2, "patch")
            blocks.append(projectors.mm_projector(torch.from_numpy(clip_features)))
        features = torch.cat(blocks, dim=1)
        embed = llm.get_input_embeddings()
        before = embed(torch.tensor([ids[:position]]))
        after = embed(torch.tensor([ids[position + 1:]]))
        embeds = torch.cat([before, features, after], dim=1)
        return llm(inputs_embeds=embeds).logits.numpy()


def our_logits(params, model_config, ids: list[int], ecg: np.ndarray | None,
               image: np.ndarray | None = None) -> np.ndarray:
    """Our logits at the real positions (an absent modality's masked slots dropped)."""
    config = UniECGConfig.from_config(model_config)
    position = ids.index(SENTINEL)
    logits = np.asarray(UniECG(config).apply(
        {"params": params}, jnp.asarray([ids], jnp.int32),
        None if ecg is None else jnp.asarray(ecg), jnp.asarray([position], jnp.int32),
        **({} if image is None else {"image": jnp.asarray(image)})))
    if config.vision is None:
        return logits
    ecg_slots, image_slots = config.num_ecg_tokens, config.num_image_tokens
    keep = np.ones(logits.shape[1], bool)
    if ecg is None:
        keep[position:position + ecg_slots] = False
    if image is None:
        keep[position + ecg_slots:position + ecg_slots + image_slots] = False
    return logits[:, keep]


IDS = [1, 17, 23, SENTINEL, 40, 41, 9, 88, 5]


def _ecg(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 12, SAMPLES)).astype(np.float32)


def _image(seed=0):
    """[1, H, W, 3] CLIP-normalised pixels (channels last, our tower's layout)."""
    size = TINY_HF["image_size"]
    return np.random.default_rng(seed + 100).standard_normal((1, size, size, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- import
def test_sharded_release_imports_in_one_step_and_matches_torch(release):
    """ECG and image tokens at the placeholder: our imported model's logits equal GEM's torch
    forward (f32, 1e-4), and so do signal-only and image-only rows (the absent block's slots
    masked; torch's sequence simply lacks them)."""
    result = gem.import_gem(release["dir"])
    config = UniECGConfig.from_config(result.model_config)
    assert (config.encoder.width, config.encoder.heads, config.encoder.layers,
            config.encoder.num_samples) == (WIDTH, 2, LAYERS, SAMPLES)
    assert config.projector.ecg_proj_dim == MM_HIDDEN and config.projector.mm_projector_depth == 2
    assert config.llm.vocab_size == 96 and config.llm.family == "llama"
    assert (config.input.prompt_format, config.input.placeholder, config.input.ecg_lead_order) == (
        "llava_v1", "sentinel", "mimic_iv")
    assert result.params["llm"]["embedding"].shape[0] == 96  # no row added for the placeholder
    # The CLIP tower's shape from mm_vision_tower's config.json, its selection from GEM's fields.
    vision = config.vision
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_layers,
            vision.num_heads, vision.select_layer, vision.select_feature) == (
        TINY_HF["image_size"], TINY_HF["patch_size"], MM_HIDDEN, TINY_HF["num_hidden_layers"],
        TINY_HF["num_attention_heads"], -2, "patch")
    assert config.num_image_tokens == IMAGE_TOKENS
    assert any("image tower" in line and "placed" in line for line in result.report)
    assert not any(name.startswith(gem.IMAGE_TOWER_PREFIX) for name in result.kept)
    assert {gem.TOWER_PREFIX + "ln_post.weight", gem.TOWER_PREFIX + "proj"} <= set(result.kept)

    ecg, image = _ecg(), _image()
    ecg_tokens = SAMPLES // PATCH + 1
    for with_ecg, with_image, slots in ((True, True, ecg_tokens + IMAGE_TOKENS),
                                        (True, False, ecg_tokens), (False, True, IMAGE_TOKENS)):
        row_ecg, row_image = (ecg if with_ecg else None), (image if with_image else None)
        want = torch_gem_logits(release, IDS, row_ecg, row_image)
        got = our_logits(result.params, result.model_config, IDS, row_ecg, row_image)
        assert got.shape == want.shape == (1, len(IDS) - 1 + slots, 96)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0,
                                   err_msg=f"ecg={with_ecg} image={with_image}")
        assert np.abs(want).max() > 0.1
    # The image tokens matter: another image changes the logits after the placeholder.
    other = our_logits(result.params, result.model_config, IDS, ecg, _image(1))
    both = our_logits(result.params, result.model_config, IDS, ecg, image)
    assert np.abs(other[0, -1] - both[0, -1]).max() > 1e-3


def test_signal_only_config_keeps_the_image_tower_verbatim(release):
    """A stage-1 config without `model.vision_tower`: the release's CLIP tensors are kept for
    export, the ECG path is GEM's (no image block)."""
    base = load_config("configs/stage1.py:tiny").model
    assert base.get("vision_tower") is None
    model = gem.release_model_config(release["dir"], base)
    assert "vision_tower" not in model
    result = gem.import_gem(release["dir"], model_config=model)
    assert "vision_tower" not in result.params
    assert any("image tower" in line and "NOT used" in line for line in result.report)
    assert {n for n in release["state"] if n.startswith(gem.IMAGE_TOWER_PREFIX)} <= set(
        result.kept)
    ecg = _ecg(4)
    np.testing.assert_allclose(our_logits(result.params, result.model_config, IDS, ecg),
                               torch_gem_logits(release, IDS, ecg), atol=1e-4, rtol=0)


def test_single_file_release_without_tower_takes_the_ecg_coca_file(release, tmp_path):
    state = {k: v for k, v in release["state"].items() if not k.startswith(gem.TOWER_PREFIX)}
    coca = {"module.ecg." + k[len(gem.TOWER_PREFIX):]: torch.from_numpy(v)
            for k, v in release["state"].items() if k.startswith(gem.TOWER_PREFIX)}
    torch.save({"state_dict": coca}, tmp_path / "ecg_coca.pt")
    directory = write_release(tmp_path / "gem", state, _gem_config(
        release["llm"], str(tmp_path / "ecg_coca.pt"), release["clip_dir"]), shards=1)
    result = gem.import_gem(directory)
    assert any(str(tmp_path / "ecg_coca.pt") in line for line in result.report)
    ecg, image = _ecg(1), _image(1)
    np.testing.assert_allclose(our_logits(result.params, result.model_config, IDS, ecg, image),
                               torch_gem_logits(release, IDS, ecg, image), atol=1e-4, rtol=0)
    os.remove(tmp_path / "ecg_coca.pt")
    with pytest.raises(CheckpointError, match="holds no ECG tower"):
        gem.import_gem(directory)


CLIP_FC1 = CLIP_NAME.format("encoder.layers.1.mlp.fc1.weight")


@pytest.mark.parametrize("change, message", [
    ("drop model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
    ("drop model.ecg_projector.weight", "model.ecg_projector.weight"),
    ("shape model.mm_projector.2.weight", "model.mm_projector.2.weight"),
    ("shape model.ecg_tower.ecg_tower.transformer.resblocks.1.attn.in_proj_weight",
     "resblocks.1.attn.in_proj_weight"),
    ("add model.mystery.weight", "model.mystery.weight"),
    (f"drop {CLIP_FC1}", CLIP_FC1),
    (f"shape {CLIP_FC1}", CLIP_FC1),
    ("config mm_vision_tower=/nonexistent/clip", "mm_vision_tower '/nonexistent/clip'"),
    ("config mm_hidden_size=24", "mm_hidden_size 24"),
])
def test_missing_misshapen_or_unplaced_tensor_is_named(release, tmp_path, change, message):
    action, name = change.split()
    state = dict(release["state"])
    config = _gem_config(release["llm"], "x.pt", release["clip_dir"])
    if action == "drop":
        del state[name]
    elif action == "shape":
        state[name] = state[name][:-1]
    elif action == "config":
        key, value = name.split("=")
        config[key] = int(value) if value.isdigit() else value
    else:
        state[name] = np.zeros(3, np.float32)
    directory = write_release(tmp_path / "gem", state, config)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        gem.import_gem(directory)


@pytest.mark.parametrize("variant", ["tiny", "tiny_image"])
def test_round_trip_to_gem_layout_and_back(release, tmp_path, variant):
    """from-gem -> to-gem gives every release tensor back bit for bit, through the sharded writer
    (several files, one index), with the image tower imported (tiny_image) or kept (tiny)."""
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "gem_again")
    assert cli_main(["convert", "from-gem", "--gem-dir", release["dir"], "--out", ckpt,
                     "--config", f"configs/stage1.py:{variant}"]) == 0
    assert cli_main(["convert", "to-gem", "--ckpt", ckpt, "--out", out,
                     "--max-shard-size", "40KB"]) == 0
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        exported = json.load(f)["weight_map"]
    assert set(exported) == set(release["state"]) and len(set(exported.values())) > 2
    reader = gem.hf_llm.SafetensorsDir(out)
    for name, tensor in release["state"].items():  # every tensor back bit for bit
        np.testing.assert_array_equal(reader.get(name), tensor, err_msg=name)
    with open(os.path.join(out, "config.json")) as f:
        fields = json.load(f)
    assert fields["model_type"] == "llava_llama" and fields["vocab_size"] == 96
    assert fields["mm_projector_type"] == "mlp2x_gelu" and fields["mm_hidden_size"] == MM_HIDDEN
    assert fields["ecg_lead_order"] == "mimic_iv"
    assert (fields["mm_vision_select_layer"], fields["mm_vision_select_feature"]) == (-2, "patch")
    # GEM's get_ecg_encoder opens mm_ecg_tower first and loads its `module.ecg.*` strictly.
    coca = torch.load(fields["mm_ecg_tower"], weights_only=True)["state_dict"]
    EcgTower(SAMPLES, 12, PATCH, WIDTH, LAYERS, heads=2).load_state_dict(
        {k[len("module.ecg."):]: v for k, v in coca.items()}, strict=True)
    # GEM's builder loads the CLIP tower from mm_vision_tower (CLIPVisionModel.from_pretrained):
    # ours when the model has the tower, the release's own otherwise.
    if variant == "tiny_image":
        assert fields["mm_vision_tower"] == os.path.join(out, gem.VISION_TOWER_DIR)
        clip = transformers.CLIPVisionModel.from_pretrained(fields["mm_vision_tower"]).eval()
        image = _image(5)
        np.testing.assert_array_equal(hf_features(clip, image, -2, "patch"),
                                      hf_features(release["clip"], image, -2, "patch"))
    else:
        assert fields["mm_vision_tower"] == release["clip_dir"]

    assert cli_main(["convert", "export-ecg-coca", "--ckpt", ckpt,
                     "--out", str(tmp_path / "tower.safetensors")]) == 0
    tower = gem.hf_llm.safe_open(str(tmp_path / "tower.safetensors"), framework="numpy")
    np.testing.assert_array_equal(tower.get_tensor("module.ecg.conv1.weight"),
                                  release["state"][gem.TOWER_PREFIX + "conv1.weight"])
    np.testing.assert_array_equal(tower.get_tensor("model.mm_projector.2.weight"),
                                  release["state"]["model.mm_projector.2.weight"])

    first = gem.import_gem(release["dir"])
    again = gem.import_gem(out)
    ecg, image = _ecg(2), _image(2)
    np.testing.assert_array_equal(our_logits(again.params, again.model_config, IDS, ecg, image),
                                  our_logits(first.params, first.model_config, IDS, ecg, image))
    assert again.model_config.to_dict() == first.model_config.to_dict()


def test_to_gem_from_two_fake_hosts_writes_each_block_once(release, tmp_path, monkeypatch):
    """`export_gem` as two hosts of a pod would run it (8 devices, host h owning devices 4h..4h+3,
    `jax.process_index` patched; host 0 first, as the writer's barriers order them): each host
    writes only the blocks it owns, together exactly the release, bit for bit, one index."""
    from uniecg_jax.convert import sharded_writer
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    result = gem.import_gem(release["dir"], mesh=mesh)
    devices = [d.id for d in mesh.devices.flat]
    owned, written = sharded_writer._owned_shards, {}
    write_host_blocks = sharded_writer.write_host_blocks
    host = {"index": 0}

    def owned_by_fake_host(array):
        if isinstance(array, jax.Array):
            mine = set(devices[4 * host["index"]:4 * host["index"] + 4])
            return [(index, data) for index, data in owned(array)
                    if next(iter(data.devices())).id in mine]
        return owned(array)   # host-computed and host-local tensors: host 0's to write

    def counted(*args, **kwargs):
        count = write_host_blocks(*args, **kwargs)
        written[host["index"]] = written.get(host["index"], 0) + count
        return count

    monkeypatch.setattr(sharded_writer, "_owned_shards", owned_by_fake_host)
    monkeypatch.setattr(sharded_writer, "write_host_blocks", counted)
    monkeypatch.setattr(jax, "process_index", lambda: host["index"])
    out = str(tmp_path / "gem")
    for index in (0, 1):
        host["index"] = index
        gem.export_gem(result.params, result.model_config, out, kept=result.kept,
                       base_config=result.gem_config, max_shard_size="40KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(release["state"])
    main_files = {os.path.join(out, name) for name in set(index["weight_map"].values())}
    main_bytes = index["metadata"]["total_size"]
    # Host 1 wrote its slices of the sharded LLM / CLIP leaves and nothing host-computed.
    assert 0 < written[1] < main_bytes and written[0] > written[1]
    clip_files = os.path.join(out, gem.VISION_TOWER_DIR, "model.safetensors")
    assert written[0] + written[1] == main_bytes + os.path.getsize(clip_files) - (
        8 + int.from_bytes(open(clip_files, "rb").read(8), "little"))
    assert all(os.path.isfile(path) for path in main_files)
    reader = gem.hf_llm.SafetensorsDir(out)
    for name, tensor in release["state"].items():
        np.testing.assert_array_equal(reader.get(name), tensor, err_msg=name)


TWO_HOST_WORKER = WORKER_PREAMBLE + """
from uniecg_jax import sharding
from uniecg_jax.convert import gem, sharded_writer
result = gem.import_gem(src, mesh=sharding.make_mesh(dict(data=1, fsdp=4, tensor=2)))
written = []
original = sharded_writer.write_host_blocks
sharded_writer.write_host_blocks = lambda *a, **k: written.append(original(*a, **k)) or written[-1]
gem.export_gem(result.params, result.model_config, dst, kept=result.kept,
               base_config=result.gem_config, max_shard_size="40KB")
leaf = result.params["vision_tower"]["layers_0"]["mlp"]["fc1"]["kernel"]
print("RESULT " + json.dumps({"process": jax.process_index(), "written": sum(written),
                              "fully_addressable": leaf.is_fully_addressable}), flush=True)
"""


@pytest.mark.slow  # two fresh JAX processes importing and exporting a release: minutes on 2 cores
def test_to_gem_from_two_real_processes_equals_the_release(release, tmp_path):
    """Two JAX processes (4 CPU devices each, gloo collectives) import a release onto one 8-device
    mesh and export it: the ECG tower's host-computed tensors gather across the hosts, every
    sharded block is written once, and the result is the release bit for bit."""
    dst = tmp_path / "gem"
    results = {r["process"]: r for r in run_two_processes(TWO_HOST_WORKER, release["dir"],
                                                          str(dst), tmp_path)}
    assert set(results) == {0, 1} and not results[1]["fully_addressable"]
    with open(dst / "model.safetensors.index.json") as f:
        index = json.load(f)
    clip_file = dst / gem.VISION_TOWER_DIR / "model.safetensors"
    clip_bytes = os.path.getsize(clip_file) - 8 - int.from_bytes(open(clip_file, "rb").read(8),
                                                                 "little")
    assert results[0]["written"] + results[1]["written"] == (index["metadata"]["total_size"]
                                                             + clip_bytes)
    assert 0 < results[1]["written"] < results[0]["written"]
    reader = gem.hf_llm.SafetensorsDir(str(dst))
    assert set(reader.keys()) == set(release["state"])
    for name, tensor in release["state"].items():
        np.testing.assert_array_equal(reader.get(name), tensor, err_msg=name)


@pytest.mark.slow  # builds the grounded conversations and a 5000-sample tower: minutes on 2 cores
def test_training_starts_from_a_gem_release(tmp_path):
    """`--config.init.gem_dir=`: the release sets the shapes and input layout, its weights are the
    initial params, and the batches carry the sentinel and GEM's lead order."""
    llm, _, _, clip, state = _gem_state(samples=5000, layers=1)  # the pipeline's 10 s at 500 Hz
    clip.save_pretrained(str(tmp_path / "clip"))
    directory = write_release(tmp_path / "gem", state,
                              _gem_config(llm, "x.pt", str(tmp_path / "clip")))
    hf_testing.tiny_tokenizer(directory, vocab_size=96)
    config = load_config("configs/stage1.py:tiny", [
        f"init.gem_dir={directory}", "data.max_length=48", "data.num_synthetic=0",
        "train.batch_size=2"])
    task = build_task(config)
    model = task.config.model
    assert (model.llm.vocab_size, model.ecg_encoder.width, model.projector.ecg_proj_dim) == (
        96, WIDTH, MM_HIDDEN)
    assert dict(model.input) == dict(prompt_format="llava_v1", placeholder="sentinel",
                                     ecg_lead_order="mimic_iv")
    batch = next(task.make_data(0, 1, 2))
    assert ((batch["input_ids"] == SENTINEL).sum(axis=1) == 1).all()
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    abstract, _ = sharding.abstract_sharded_init(task.init_params, mesh, jax.random.PRNGKey(0))
    params = task.initial_params(mesh, abstract)
    # stage1.py:tiny reads signals only: the release's CLIP tower stays out of the params.
    imported = gem.import_gem(str(directory), model_config=model)
    assert set(params) == set(imported.params) == {"ecg_tower", "llm"}
    assert jax.tree.structure(params) == jax.tree.structure(imported.params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(imported.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    batch.pop("record_key")
    loss, _ = task.loss_fn(params, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))


# ----------------------------------------------------------------------------- lead order
def test_mimic_file_and_canonical_file_reach_the_encoder_alike(tmp_path):
    import wfdb
    rng = np.random.default_rng(0)
    canonical = rng.standard_normal((SAMPLES * 10, 12)) * 0.5
    mimic_names = list(record_lib.ENCODER_LEAD_ORDERS["mimic_iv"])
    mimic = canonical[:, [record_lib.LEADS.index(n) for n in mimic_names]]
    for name, signal, leads in (("mimic", mimic, mimic_names),
                                ("ptbxl", canonical, list(record_lib.LEADS))):
        wfdb.wrsamp(name, fs=500, units=["mV"] * 12, sig_name=leads, p_signal=signal,
                    fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12,
                    write_dir=str(tmp_path))
    inputs = {name: record_lib.to_encoder_lead_order(
        read_record(str(tmp_path / name)).to_encoder_input(), "mimic_iv")
        for name in ("mimic", "ptbxl")}
    np.testing.assert_array_equal(inputs["mimic"], inputs["ptbxl"])
    # GEM read MIMIC files unmapped: under the GEM order the encoder sees the file's own rows.
    np.testing.assert_allclose(inputs["mimic"], mimic.T[:, :5000], atol=1e-3)
    canonical_rows = record_lib.to_encoder_lead_order(
        read_record(str(tmp_path / "mimic")).to_encoder_input(), "canonical")
    assert not np.allclose(canonical_rows, inputs["mimic"])  # aVL / aVF differ


def test_interpreter_feeds_the_encoder_in_the_models_lead_order(release, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    assert cli_main(["convert", "from-gem", "--gem-dir", release["dir"], "--out", ckpt,
                     "--config", "configs/stage1.py:tiny"]) == 0
    interpreter = Interpreter.load(ckpt)
    assert interpreter.model.config.input.ecg_lead_order == "mimic_iv"
    # Served with the sentinel: the cached decode equals greedy full forward passes.
    canonical = _ecg(3)
    served = interpreter.interpret(canonical, "w5 w6", max_new_tokens=3, stop_token_ids=())
    prompt = interpreter.inputs.prompt_ids("w5 w6", with_ecg=True)
    assert prompt.count(SENTINEL) == 1 and max(prompt) < 96
    ids, mimic_rows = list(prompt), canonical[:, [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]]
    for _ in range(3):
        logits = our_logits(interpreter.params, interpreter.config.model, ids, mimic_rows)
        ids.append(int(np.argmax(logits[0, -1])))
    assert served[0] == interpreter.tokenizer.decode(ids[len(prompt):],
                                                     skip_special_tokens=True).strip()
    seen = []

    class Stop(Exception):
        pass

    def record_and_stop(batch, *rest):   # batch: the ModelInputs the encoder is fed
        seen.append(batch)
        raise Stop

    interpreter._generate = record_and_stop
    with pytest.raises(Stop):
        interpreter.interpret(canonical, "w5 w6", max_new_tokens=1)
    np.testing.assert_array_equal(seen[0].ecg[0],
                                  canonical[0][[0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]])


# ----------------------------------------------------------------------------- llava_v1 token ids
CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: Interpret this ECG. ASSISTANT: Sinus rhythm at 72 bpm, normal axis.",
    "USER: What is the rate? ASSISTANT: 72 bpm; the PR interval is 160 ms.",
    "\n leads I II III aVR aVL aVF V1 V2 V3 V4 V5 V6",
    "questions. USER: Interpret this ECG. ASSISTANT: Sinus rhythm.",
]


def llama_tokenizer(legacy: bool):
    """A tiny Llama tokenizer: BPE with byte fallback, legacy (Metaspace prepend "always": a "▁"
    after every special token) or not (Metaspace prepend "first"), bos added as Llama's."""
    from transformers import LlamaTokenizer
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Trained without a prefix at line starts, so that both "USER:" (after `</s>`, non-legacy)
    # and "▁USER:" are whole tokens, as "USER" and "▁USER" have the same length in Llama's vocab
    # (what preprocess_v1's one-token correction for non-legacy tokenizers assumes).
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = json.loads(core.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                               legacy=legacy, add_bos_token=True)
    tokenizer.pad_token = tokenizer.unk_token
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id
    return tokenizer


def llava_prompt(messages, system=LLAVA_V1.system):
    """conv_llava_v1.get_prompt(): SeparatorStyle.TWO with sep " ", sep2 "</s>"."""
    seps, out = [" ", "</s>"], system + " "
    for index, (role, message) in enumerate(messages):
        out += f"{role}: {message}{seps[index % 2]}" if message else f"{role}:"
    return out


def llava_tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = [x for pair in zip(chunks, [[SENTINEL] * (offset + 1)] * len(chunks))
                 for x in pair][:-1]
    for piece in separated:
        ids.extend(piece[offset:])
    return ids


def llava_preprocess_v1(turns, tokenizer):
    """(input_ids, labels) as preprocess_multimodal + preprocess_v1 with has_image=True."""
    messages = []
    for index, (role, text) in enumerate(turns):
        if index == 0:
            text = "<image>\n" + text.replace("<image>", "").strip()
        messages.append(("USER" if role == "user" else "ASSISTANT", text))
    conversation = llava_prompt(messages)
    ids = llava_tokenizer_image_token(conversation, tokenizer)
    labels = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [-100] * cur
    for index, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(llava_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(llava_tokenizer_image_token(parts[0], tokenizer)) - 2
        if index != 0 and not tokenizer.legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur:cur + instruction_len] = [-100] * instruction_len
        cur += round_len
    labels[cur:] = [-100] * (len(labels) - cur)
    if cur != len(ids):  # LLaVA: "WARNING: tokenization mismatch ... (ignored)"
        return ids, None
    return ids, labels


TURNS = [("user", "Interpret this ECG. <image>"), ("assistant", "Sinus rhythm at 72 bpm."),
         ("user", "What is the rate?"), ("assistant", "72 bpm; the PR interval is 160 ms.")]


def test_mask_starts_at_the_lone_space_before_a_digit_answer_as_llava():
    """An answer whose first token cannot absorb the space ("▁" then "7" with a vocabulary without
    "▁7"): preprocess_v1's count trains that lone "▁"; so does ours."""
    tokenizer = llama_tokenizer(True)
    turns = [("user", "What is the rate?"), ("assistant", "7 9")]
    ids, mask = InputBuilder(tokenizer, LLAVA_V1, placeholder="sentinel").conversation(turns)
    want_ids, labels = llava_preprocess_v1(turns, tokenizer)
    assert ids == want_ids and labels is not None
    assert mask == [int(label != -100) for label in labels]
    first = mask.index(1)
    assert tokenizer.convert_ids_to_tokens(ids[first - 1:first + 1]) == ["▁ASSISTANT:", "▁"]


@pytest.mark.parametrize("legacy", [True, False], ids=["llama_legacy", "metaspace_first"])
def test_llava_v1_token_ids_and_mask_equal_llavas(legacy):
    tokenizer = llama_tokenizer(legacy)
    builder = InputBuilder(tokenizer, LLAVA_V1, placeholder="sentinel")
    ids, mask = builder.conversation(TURNS)
    want_ids, labels = llava_preprocess_v1(TURNS, tokenizer)
    assert ids == want_ids
    if legacy:  # LLaVA's round-by-round token counts add up for this tokenizer: same mask
        assert mask == [int(label != -100) for label in labels]
    else:
        # transformers 5's non-legacy Llama tokenizer gives "USER:" after `</s>` as many tokens
        # as a round tokenized alone, so preprocess_v1's one-token correction for non-legacy
        # tokenizers overshoots and LLaVA would drop this conversation; we still train it.
        assert labels is None
    trained = [token for token, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained) .replace(" ", "") == (
        "Sinus rhythm at 72 bpm.</s>72 bpm; the PR interval is 160 ms.</s>").replace(" ", "")
    assert trained.count(tokenizer.eos_token_id) == 2 and trained[-1] == tokenizer.eos_token_id
    # Serving: model_ecg.py's prompt (question, then the open assistant turn).
    prompt = builder.prompt_ids("Interpret this ECG.", with_ecg=True)
    assert prompt == llava_tokenizer_image_token(
        llava_prompt([("USER", "<image>\nInterpret this ECG."), ("ASSISTANT", None)]), tokenizer)
    assert ids[:len(prompt)] == prompt and ids.count(SENTINEL) == 1


@pytest.mark.parametrize("legacy", [True, False], ids=["llama_legacy", "metaspace_first"])
def test_project_format_is_tokenized_as_a_whole_string(legacy):
    tokenizer = llama_tokenizer(legacy)
    tokenizer.add_tokens(["<ecg>"], special_tokens=True)
    builder = InputBuilder(tokenizer, VICUNA)
    ids, mask = builder.conversation(TURNS)
    text = builder.text(TURNS)
    assert text.startswith("USER: <ecg>\nInterpret this ECG. ASSISTANT: Sinus")
    assert ids == tokenizer(text).input_ids  # one string, `<ecg>` a special token
    # Pieces tokenized apart (the old way) put a lone "▁" before every answer.
    lone_space = tokenizer.convert_tokens_to_ids("▁")
    assert tokenizer(" ASSISTANT: ", add_special_tokens=False).input_ids[-1] == lone_space
    answer = tokenizer("Sinus", add_special_tokens=False).input_ids[0]  # "▁Sinus"
    assert ids[ids.index(answer) - 1] != lone_space
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m]).replace(" ", "")
    assert trained == "Sinusrhythmat72bpm.</s>72bpm;thePRintervalis160ms.</s>"
