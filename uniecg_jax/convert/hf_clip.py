"""Hugging Face CLIP vision tensors <-> `ClipVisionTower` params (both directions).

Source layouts (the prefix is detected, or pass `prefix=`; one importer serves them all):
  `CLIPVisionModel` / `CLIPModel` safetensors dir   `vision_model.embeddings.class_embedding`, ...
      (openai/clip-vit-large-patch14-336; a CLIPModel's text tower, projections and logit_scale
      lie outside the prefix and are ignored)
  transformers >= 5 `CLIPVisionModel.save_pretrained`   `embeddings.class_embedding`, ...
  a LLaVA / GEM release                            `model.vision_tower.vision_tower.vision_model.*`
      (LlavaMetaModel.vision_tower = CLIPVisionTower, whose .vision_tower = CLIPVisionModel:
      llava/model/multimodal_encoder/clip_encoder.py in haotian-liu/LLaVA@c121f04 and
      lanxiang1017/GEM@c8a580f)

The mapping is declarative (`TENSOR_RULES`: HF name, our path, layout kind), with the LLM
converter's hooks for "linear" (torch [out, in] -> kernel [in, out]) and "reshape", plus "conv2d"
(torch Conv2d [hidden, C, kh, kw] -> kernel [kh, kw, C, hidden]). Every shape is checked against
the abstract Flax tree before any data is read; a mismatch raises `CheckpointError` naming the
tensor, our parameter and both shapes.

Export (`export_tensors`) hands the tensors to `convert.sharded_writer` as block layouts of our
(possibly multi-host sharded) leaves, so no host gathers the tower; `save_clip_vision_hf` writes
`vision_model.*` (the layout of the hub checkpoints and of transformers 4, which LLaVA runs;
transformers 5 loads it too) with a `config.json` and `preprocessor_config.json` that
`CLIPVisionModel.from_pretrained` / `CLIPImageProcessor.from_pretrained` read; a GEM export
(`convert.gem`) writes the same tensors under `GEM_PREFIX`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.convert import sharded_writer
from uniecg_jax.convert.hf_llm import (SafetensorsDir, TensorRule, _get_path, _set_path, hf_layout,
                                       hf_shape, hf_to_ours, ours_to_hf)
from uniecg_jax.data.image_preprocess import CLIP_MEAN, CLIP_STD
from uniecg_jax.errors import CheckpointError
from uniecg_jax.layers.params import abstract_module_params
from uniecg_jax.models.clip_vision import ClipVisionConfig, ClipVisionTower, VISION_PRESETS

HF_PREFIX = "vision_model."                                   # hub / transformers 4 layout
GEM_PREFIX = "model.vision_tower.vision_tower.vision_model."  # inside a LLaVA / GEM release
PREFIXES = (GEM_PREFIX, "model.vision_tower.vision_tower.",
            "vision_tower.vision_tower.vision_model.", HF_PREFIX, "")
ANCHOR = "embeddings.class_embedding"
# First components of the tower's own tensors (to tell them apart when the prefix is "").
TOWER_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
# Buffers some checkpoints saved (transformers 4 before `persistent=False`): not parameters.
IGNORED_SUFFIXES = ("position_ids",)
# torch Conv2d weight [hidden, C, kh, kw] from our kernel [kh, kw, C, hidden].
CONV2D_TO_HF = (3, 2, 0, 1)

GLOBAL_RULES = (
    TensorRule("embeddings.class_embedding", ("embeddings", "class_embedding"), "reshape"),
    TensorRule("embeddings.patch_embedding.weight", ("embeddings", "patch_embedding", "kernel"),
               "conv2d"),
    TensorRule("embeddings.position_embedding.weight", ("embeddings", "position_embedding"),
               "reshape"),
    TensorRule("pre_layrnorm.weight", ("pre_layrnorm", "scale"), "reshape"),
    TensorRule("pre_layrnorm.bias", ("pre_layrnorm", "bias"), "reshape"),
    TensorRule("post_layernorm.weight", ("post_layernorm", "scale"), "reshape"),
    TensorRule("post_layernorm.bias", ("post_layernorm", "bias"), "reshape"),
)
LAYER_RULES = tuple(
    [TensorRule(f"encoder.layers.{{i}}.self_attn.{proj}.{kind}", ("self_attn", proj, leaf),
                "linear" if kind == "weight" else "reshape")
     for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
     for kind, leaf in (("weight", "kernel"), ("bias", "bias"))]
    + [TensorRule(f"encoder.layers.{{i}}.{norm}.{kind}", (norm, leaf), "reshape")
       for norm in ("layer_norm1", "layer_norm2")
       for kind, leaf in (("weight", "scale"), ("bias", "bias"))]
    + [TensorRule(f"encoder.layers.{{i}}.mlp.{fc}.{kind}", ("mlp", fc, leaf),
                  "linear" if kind == "weight" else "reshape")
       for fc in ("fc1", "fc2")
       for kind, leaf in (("weight", "kernel"), ("bias", "bias"))])


def leaf_rules(config: ClipVisionConfig) -> list[tuple[tuple[str, ...], TensorRule, str]]:
    """(our leaf path, rule, HF name without prefix) for every tensor of the tower."""
    entries = [(rule.ours, rule, rule.hf) for rule in GLOBAL_RULES]
    for index in range(config.num_layers):
        entries += [((f"layers_{index}",) + rule.ours, rule, rule.hf.format(i=index))
                    for rule in LAYER_RULES]
    return entries


def _hf_shape(rule: TensorRule, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.kind == "conv2d":        # ours [kh, kw, C, D] <-> torch [D, C, kh, kw]
        return (ours_shape[3], ours_shape[2], ours_shape[0], ours_shape[1])
    return hf_shape(rule, ours_shape)


def _to_ours(rule: TensorRule, tensor: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind == "conv2d":
        return np.ascontiguousarray(tensor.transpose(2, 3, 1, 0))
    return hf_to_ours(rule, tensor, ours_shape)


def _to_hf(rule: TensorRule, array: np.ndarray) -> np.ndarray:
    if rule.kind == "conv2d":
        return np.ascontiguousarray(array.transpose(CONV2D_TO_HF))
    return ours_to_hf(rule, array)


class _MappingReader:
    """`SafetensorsDir`'s interface (keys / shape / get) over an in-memory state dict."""

    def __init__(self, state: Mapping[str, Any]):
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get(self, name: str) -> np.ndarray:
        value = self.state[name]
        if hasattr(value, "detach"):     # a torch tensor (bf16 has no numpy form: via float32)
            value = value.detach().cpu().float().numpy()
        return np.asarray(value)


def abstract_params(config: ClipVisionConfig) -> dict:
    """Shapes/dtypes of `ClipVisionTower` params (nothing allocated)."""
    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels),
                                  jnp.float32)
    return abstract_module_params(ClipVisionTower(config), pixels)


def detect_prefix(keys: Iterable[str]) -> str | None:
    """The first of `PREFIXES` under which the tower's class embedding is a key, else None."""
    keys = set(keys)
    return next((p for p in PREFIXES if p + ANCHOR in keys), None)


def load_clip_vision(source: str | os.PathLike | Mapping[str, Any], config: ClipVisionConfig, *,
                     prefix: str | None = None, abstract: Any = None) -> dict:
    """Reads the CLIP vision tensors of `source` into `ClipVisionTower` params.

    Args:
      source: an HF directory (model.safetensors or a sharded index) or a state dict (name ->
        array / torch tensor), e.g. the tensors of a GEM release already read by its importer.
      config: the tower shape the tensors must match.
      prefix: the tensor-name prefix of the tower (default: detected among `PREFIXES`).
      abstract: target tree of ShapeDtypeStructs; leaves with a `.sharding` are placed on it
        (default: unsharded numpy arrays in the param dtype).
    Raises:
      CheckpointError naming the source and tensor on a missing, unexpected or wrong-shaped tensor.
    """
    if isinstance(source, Mapping):
        reader, label = _MappingReader(source), "<state dict>"
    else:
        label = os.fspath(source)
        if not os.path.isdir(label):
            raise CheckpointError(f"{label}: not a directory (expected an HF CLIP checkpoint)")
        reader = SafetensorsDir(label)
    keys = reader.keys()
    if prefix is None:
        prefix = detect_prefix(keys)
        if prefix is None:
            raise CheckpointError(f"{label}: no CLIP vision tower found: none of "
                                  f"{[p + ANCHOR for p in PREFIXES]} is a tensor (first names: "
                                  f"{keys[:5]})")
    entries = leaf_rules(config)
    abstract = abstract if abstract is not None else abstract_params(config)
    available = set(keys)
    missing = [prefix + name for _, _, name in entries if prefix + name not in available]
    if missing:
        raise CheckpointError(f"{label}: missing tensors {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} (model: {config.num_layers} "
                              f"layers)")
    needed = {prefix + name for _, _, name in entries}
    unexpected = sorted(
        key for key in available - needed
        if key.startswith(prefix) and not key.endswith(IGNORED_SUFFIXES)
        and (prefix or key.startswith(TOWER_ROOTS)))
    if unexpected:
        raise CheckpointError(f"{label}: tower tensors the model has no place for: "
                              f"{unexpected[:8]} (a deeper tower than num_layers="
                              f"{config.num_layers}?)")
    for path, rule, name in entries:      # every shape before any data
        target = _get_path(abstract, path)
        want, got = _hf_shape(rule, tuple(target.shape)), reader.shape(prefix + name)
        if got != want:
            raise CheckpointError(
                f"{label}: tensor {prefix + name} has shape {got}, but {'/'.join(path)} "
                f"{tuple(target.shape)} needs {want} (check image_size, patch_size, hidden_size, "
                f"intermediate_size)")
    params: dict = {}
    for path, rule, name in entries:
        target = _get_path(abstract, path)
        host = _to_ours(rule, reader.get(prefix + name), tuple(target.shape)).astype(target.dtype)
        sharding = getattr(target, "sharding", None)
        if sharding is not None:
            host = jax.make_array_from_callback(target.shape, sharding,
                                                lambda index, host=host: host[index])
        _set_path(params, path, host)
    return params


def clip_vision_state_dict(params: Any, config: ClipVisionConfig, prefix: str = HF_PREFIX,
                           dtype: Any = np.float32) -> Iterable[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy tensor) for every tower tensor, gathered to this host."""
    for path, rule, name in leaf_rules(config):
        try:
            array = np.asarray(jax.device_get(_get_path(params, path))).astype(dtype)
        except KeyError:
            raise CheckpointError(f"params have no leaf {'/'.join(path)} (needed for "
                                  f"{prefix + name})") from None
        yield prefix + name, _to_hf(rule, array)


def hf_config_dict(config: ClipVisionConfig, torch_dtype: str = "float32") -> dict:
    """transformers' `CLIPVisionConfig` fields of `config` (config.json of a CLIPVisionModel)."""
    return dict(architectures=["CLIPVisionModel"], model_type="clip_vision_model",
                hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                num_channels=config.num_channels, image_size=config.image_size,
                patch_size=config.patch_size, hidden_act="quick_gelu",
                layer_norm_eps=config.layer_norm_eps, attention_dropout=0.0,
                dtype=torch_dtype)


def preprocessor_config_dict(config: ClipVisionConfig) -> dict:
    """`CLIPImageProcessor` settings (preprocessor_config.json) for the tower's input size."""
    return dict(image_processor_type="CLIPImageProcessor", do_resize=True,
                size={"shortest_edge": config.image_size}, resample=3, do_center_crop=True,
                crop_size={"height": config.image_size, "width": config.image_size},
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def export_tensors(params: Any, config: ClipVisionConfig, prefix: str = HF_PREFIX,
                   dtype: Any = None) -> list[sharded_writer.ExportTensor]:
    """Every tower tensor under `prefix` as a lazy `ExportTensor` (the leaves may be sharded over
    many hosts; the writer applies each hook per block on the device that holds it)."""
    tensors = []
    for path, rule, name in leaf_rules(config):
        try:
            array = _get_path(params, path)
        except KeyError:
            raise CheckpointError(f"params have no leaf {'/'.join(path)} (needed for "
                                  f"{prefix + name})") from None
        layout = (sharded_writer.TensorLayout(permute=CONV2D_TO_HF) if rule.kind == "conv2d"
                  else hf_layout(rule, len(array.shape)))
        tensors.append(sharded_writer.ExportTensor(prefix + name, array, layout, dtype))
    return tensors


def save_clip_vision_hf(params: Any, config: ClipVisionConfig, out_dir: str,
                        dtype: Any = np.float32) -> str:
    """Writes a directory `CLIPVisionModel.from_pretrained` loads: config.json,
    preprocessor_config.json and model.safetensors (`vision_model.*` names). Call it on every host
    of a multi-host job (each writes the slices it holds; host 0 the JSON files)."""
    np_dtype = np.dtype(dtype)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config_dict(config, np_dtype.name), f, indent=2)
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor_config_dict(config), f, indent=2)
    sharded_writer.write_safetensors(export_tensors(params, config, HF_PREFIX, np_dtype), out_dir,
                                     max_shard_size=None, metadata={"format": "pt"},
                                     progress=False)
    return out_dir


def _config_json(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "<config>"
    path = os.path.join(os.fspath(source), "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (needed to infer the vision tower's shape)")
    with open(path) as f:
        return json.load(f), path


def _llava_tower_shape(tower: str, label: str) -> dict[str, Any]:
    """Shape fields of LLaVA's `mm_vision_tower`: a local CLIP directory (its config.json, as
    LLaVA's `build_vision_tower` accepts any existing path) or an OpenAI ViT-L hub name."""
    if os.path.isdir(tower):
        shape = vision_config_from_hf(tower).to_dict()
        return {k: shape[k] for k in ("image_size", "patch_size", "num_channels", "hidden_size",
                                      "intermediate_size", "num_layers", "num_heads",
                                      "layer_norm_eps")}
    if "clip-vit-large-patch14-336" in tower:
        return dict(VISION_PRESETS["vit_l14_336"])
    if "clip-vit-large-patch14" in tower:
        return dict(VISION_PRESETS["vit_l14_336"], image_size=224)
    raise CheckpointError(f"{label}: mm_vision_tower {tower!r} is neither a local CLIP directory "
                          "nor an OpenAI CLIP ViT-L whose shape is known; point it at the "
                          "tower's HF directory (config.json)")


def vision_config_from_hf(source: str | os.PathLike | Mapping[str, Any],
                          **overrides: Any) -> ClipVisionConfig:
    """`ClipVisionConfig` from an HF config.json (a directory or the parsed dict) of a
    `CLIPVisionModel` (`clip_vision_model`), a `CLIPModel` (`clip`: its `vision_config`) or a
    LLaVA / GEM release (`mm_vision_tower`: a local CLIP directory or an OpenAI ViT-L; its
    `mm_vision_select_layer`, `mm_vision_select_feature` and `image_aspect_ratio` are taken too).
    `overrides` set any field.
    """
    hf, label = _config_json(source)
    fields: dict[str, Any] = {}
    if "mm_vision_tower" in hf:
        fields.update(_llava_tower_shape(str(hf["mm_vision_tower"]), label))
        fields["select_layer"] = int(hf.get("mm_vision_select_layer", -2))
        fields["select_feature"] = str(hf.get("mm_vision_select_feature", "patch"))
        aspect = str(hf.get("image_aspect_ratio", "square"))
        if aspect not in ("square", "ori", "pad"):
            raise CheckpointError(f"{label}: image_aspect_ratio {aspect!r} is not supported "
                                  "(square/ori, pad)")
        fields["image_aspect_ratio"] = "pad" if aspect == "pad" else "ori"
    else:
        vision = hf.get("vision_config", hf) if hf.get("model_type") == "clip" else hf
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise CheckpointError(f"{label}: model_type {hf.get('model_type')!r} is not a CLIP "
                                  "vision model (clip_vision_model, clip, llava)")
        act = vision.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise CheckpointError(f"{label}: hidden_act {act!r}; the tower implements quick_gelu")
        fields.update(image_size=int(vision.get("image_size", 224)),
                      patch_size=int(vision.get("patch_size", 32)),
                      num_channels=int(vision.get("num_channels", 3)),
                      hidden_size=int(vision.get("hidden_size", 768)),
                      intermediate_size=int(vision.get("intermediate_size", 3072)),
                      num_layers=int(vision.get("num_hidden_layers", 12)),
                      num_heads=int(vision.get("num_attention_heads", 12)),
                      layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)))
    fields.update(overrides)
    try:
        return ClipVisionConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{label}: {e}") from None
