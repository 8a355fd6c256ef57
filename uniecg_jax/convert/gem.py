"""GEM / LLaVA releases <-> UniECG stage-1 checkpoints (both directions, one step each).

A GEM release (lanxiang1017/GEM, saved by LLaVA's trainer from `LlavaLlamaForCausalLM`) is an HF
directory: `config.json` with `model_type "llava_llama"` and GEM's fields (`mm_ecg_tower`: the
ECG-CoCa `.pt`, `open_clip_config`, `ecg_projector_type "linear"`, `mm_hidden_size`,
`mm_projector_type "mlp2x_gelu"`, `mm_vision_tower`, ...), and `model.safetensors` or shards with
`model.safetensors.index.json`. Its tensors fall in groups, each routed by name prefix (`ROUTES`)
to one importer:

  model.embed_tokens / model.layers.* / model.norm / lm_head   -> the LLM (`convert.hf_llm`)
  model.ecg_tower.ecg_tower.*, model.ecg_projector.*,
  model.mm_projector.{0,2}.*                                   -> the ECG tower (`convert.ecg_coca`)
  model.vision_tower.vision_tower.vision_model.*                -> the CLIP image tower
                                                                  (`convert.hf_clip`)
  model.image_newline, other model.vision_tower.* buffers        -> kept verbatim for export
Every tensor is routed or named in the error; the tower's `ln_post` / `proj` (unused by GEM's
`output_last_transformer_layer` forward) are kept for export too. When the release holds no ECG
tower, the ECG-CoCa `.pt` that `mm_ecg_tower` names (or `ecg_tower_ckpt`) supplies it. The image
tower's shape comes from `mm_vision_tower` as LLaVA's `build_vision_tower` reads it (a local CLIP
directory's config.json, or the OpenAI ViT-L hub name), its feature selection from
`mm_vision_select_layer` / `mm_vision_select_feature`; a stage-1 config without
`model.vision_tower` (signal only) keeps the tower's tensors verbatim instead.

Export (`export_gem`) writes every tensor through `convert.sharded_writer` in one plan (LLM, ECG
tower + projectors, CLIP tower, kept tensors; one index by host 0): call it on every host of a pod,
each writes the slices it holds, one tensor at most on a host at a time. GEM's loader
(llava/model/builder.py `load_pretrained_model`) builds the towers from the files the config names
rather than from the release's tensors (`CLIPECGTower` opens `mm_ecg_tower`, `CLIPVisionTower.
load_model` runs `CLIPVisionModel.from_pretrained(mm_vision_tower)`), so the export also writes
the ECG-CoCa `.pt` (host 0, read back from the written shards) and the CLIP tower as an HF
`CLIPVisionModel` directory, and points both fields at them.

The imported model keeps GEM's input layout (`model.input`): LLaVA's `llava_v1` prompt, a sentinel
placeholder (no `<ecg>` row: the vocabulary keeps its size) and the MIMIC-IV-ECG lead order the
ECG-CoCa tower was trained on. Facts from GEM commit c8a580f: llava/model/llava_arch.py (tower ->
ecg_projector -> mm_projector, features spliced at the -200 placeholder), llava/model/
multimodal_projector/builder.py (projector layouts), llava/model/multimodal_encoder/clip_encoder.py
(`CLIPECGTower`, `CLIPVisionTower.feature_select`), llava/model/multimodal_encoder/builder.py
(`build_vision_tower`), ecg_coca/open_clip/model.py (heads = width // head_width 64).

    result = import_gem("/ckpt/GEM", mesh=mesh)           # params on their shardings + config
    export_gem(params, config, "/out/GEM", kept=...)       # GEM's layout again
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from uniecg_jax import sharding
from uniecg_jax.convert import ecg_coca, hf_clip, hf_llm, sharded_writer
from uniecg_jax.errors import CheckpointError
from uniecg_jax.models.ecg_encoder import ECGEncoderConfig, ProjectorConfig
from uniecg_jax.models.schema import InputFormatConfig
from uniecg_jax.models.stage1 import UniECG, UniECGConfig

TOWER_PREFIX = "model.ecg_tower.ecg_tower."
PROJECTOR_PREFIX = "model."
# open_clip's default head width: heads = width // 64 (ecg_coca/open_clip/model.py CLIPEcgCfg).
OPEN_CLIP_HEAD_WIDTH = 64
# Where a converted checkpoint keeps what it does not use, for `to-gem`.
SIDECAR_DIR = "gem"
SIDECAR_CONFIG = "config.json"
SIDECAR_TENSORS = "kept.safetensors"
# GEM's input layout (see the module docstring).
GEM_INPUT = InputFormatConfig(prompt_format="llava_v1", placeholder="sentinel",
                              ecg_lead_order="mimic_iv")
# Fields GEM's loader reads for the image tower and projectors (scripts/train_gem.sh defaults),
# written by `export_gem` when the checkpoint came from elsewhere.
GEM_DEFAULT_FIELDS = {
    "open_clip_config": "coca_ViT-B-32", "ecg_projector_type": "linear",
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
    "image_aspect_ratio": "ori", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    "use_mm_proj": True, "tune_mm_mlp_adapter": False, "tokenizer_padding_side": "right",
}
ECG_TOWER_FILE = "ecg_coca.pt"   # the `.pt` `mm_ecg_tower` points to in an exported release
VISION_TOWER_DIR = "clip_vision"  # the CLIPVisionModel dir `mm_vision_tower` points to
IMAGE_TOWER_PREFIX = "model.vision_tower."
COCA_EMBED_DIM = 512             # coca_ViT-B-32 embed_dim: the width of the tower's `proj`


# ----------------------------------------------------------------------------- reading a release
def read_gem_config(gem_dir: str) -> dict:
    """GEM's `config.json` (checked to be a LLaVA model with an ECG tower)."""
    path = os.path.join(gem_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; {gem_dir} is not a GEM release")
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if config.get("model_type") not in hf_llm.LLAVA_FAMILIES:
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not a GEM / "
                              f"LLaVA model ({', '.join(hf_llm.LLAVA_FAMILIES)})")
    if "mm_ecg_tower" not in config:
        raise CheckpointError(f"{path}: no mm_ecg_tower field: a LLaVA model without GEM's ECG "
                              "tower")
    return config


@dataclasses.dataclass
class GemImport:
    """What `import_gem` returns.

    params: {"ecg_tower": ..., "llm": ...[, "vision_tower": ...]} on the target shardings.
    model_config: the stage-1 `model` group (llm, ecg_encoder, projector, input).
    kept: tensors no model part takes (ECG-CoCa's unused head; the image tower under a
      signal-only config) by name, for export.
    gem_config: the release's config.json.
    report: one line per tensor group (what was placed, what was found and not used).
    """
    params: dict
    model_config: ml_collections.ConfigDict
    kept: dict[str, np.ndarray]
    gem_config: dict
    report: list[str]


@dataclasses.dataclass
class _Release:
    """An open release: its reader, config and tensor names grouped by importer."""
    directory: str
    config: dict
    reader: hf_llm.SafetensorsDir
    groups: dict[str, list[str]]
    ecg_tower_ckpt: str | None

    def tower_state(self) -> tuple[dict[str, np.ndarray], str]:
        """The ECG tower + projector tensors ({name: array}) and where the tower came from."""
        names = self.groups.get("ecg_tower", [])
        state = {name: self.reader.get(name) for name in names}
        if TOWER_PREFIX + "conv1.weight" in state:
            return state, self.directory
        path = self.ecg_tower_ckpt or self.config.get("mm_ecg_tower")
        if not path or not os.path.isfile(path):
            raise CheckpointError(
                f"{self.directory}: the release holds no ECG tower ({TOWER_PREFIX}*) and its "
                f"mm_ecg_tower {path!r} is not a file; pass the ECG-CoCa checkpoint "
                "(--ecg-tower / ecg_tower_ckpt)")
        tower, _ = ecg_coca.load_state_dict(path)
        return {**tower, **state}, path


def _route(name: str) -> str | None:
    for prefix, group in ROUTES:
        if name.startswith(prefix):
            return group
    return None


def open_release(gem_dir: str, ecg_tower_ckpt: str | None = None) -> _Release:
    """Reads config.json and the tensor index; every tensor name routed to an importer, else
    `CheckpointError` naming the unplaced ones."""
    config = read_gem_config(gem_dir)
    reader = hf_llm.SafetensorsDir(gem_dir)
    groups: dict[str, list[str]] = {}
    unplaced = []
    for name in reader.keys():
        group = _route(name)
        if group is None:
            unplaced.append(name)
        else:
            groups.setdefault(group, []).append(name)
    if unplaced:
        raise CheckpointError(f"{gem_dir}: tensors no part of the model takes: "
                              f"{sorted(unplaced)[:8]}{' ...' if len(unplaced) > 8 else ''}")
    return _Release(gem_dir, config, reader, groups, ecg_tower_ckpt)


def _encoder_config(state: Mapping[str, np.ndarray], prefix: str, gem_config: dict
                    ) -> ml_collections.ConfigDict:
    """`model.ecg_encoder` from the tower's tensor shapes (conv1 [width, leads, patch],
    positional_embedding [1 + samples / patch, width], c_fc [mlp, width], block count)."""
    conv = state.get(prefix + "conv1.weight")
    positions = state.get(prefix + "positional_embedding")
    if conv is None or positions is None or conv.ndim != 3:
        raise CheckpointError(f"ECG tower: missing or misshapen {prefix}conv1.weight / "
                              f"{prefix}positional_embedding")
    width, leads, patch = (int(d) for d in conv.shape)
    layers = len({int(m.group(1)) for name in state
                  if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", name))})
    fc = state.get(prefix + "transformer.resblocks.0.mlp.c_fc.weight")
    heads = int(gem_config.get("ecg_tower_heads") or max(1, width // OPEN_CLIP_HEAD_WIDTH))
    encoder = ECGEncoderConfig(
        width=width, layers=layers, heads=heads, patch_size=patch, num_leads=leads,
        num_samples=(int(positions.shape[0]) - 1) * patch,
        mlp_ratio=float(fc.shape[0]) / width if fc is not None else 4.0)
    return ml_collections.ConfigDict(encoder.to_dict())


def _projector_config(gem_config: dict, llm_hidden_size: int) -> ml_collections.ConfigDict:
    if gem_config.get("ecg_projector_type", "linear") != "linear":
        raise CheckpointError(f"config.json: ecg_projector_type "
                              f"{gem_config['ecg_projector_type']!r} is not supported (linear)")
    kind = gem_config.get("mm_projector_type", "linear")
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match:
        raise CheckpointError(f"config.json: mm_projector_type {kind!r} is not supported "
                              "(mlp<N>x_gelu)")
    if "mm_hidden_size" not in gem_config:
        raise CheckpointError("config.json: no mm_hidden_size (the ecg_projector's output width)")
    return ml_collections.ConfigDict(ProjectorConfig(
        ecg_proj_dim=int(gem_config["mm_hidden_size"]), llm_hidden_size=llm_hidden_size,
        mm_projector_depth=int(match.group(1))).to_dict())


def _vision_prefix(release: _Release) -> str | None:
    """The CLIP tower's name prefix among the release's image-tower tensors, None without one."""
    names = release.groups.get("image_tower", [])
    prefix = hf_clip.detect_prefix(names)
    return prefix if prefix and prefix.startswith(IMAGE_TOWER_PREFIX) else None


def _vision_config(release: _Release, projector: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict | None:
    """`model.vision_tower` of a release that holds a CLIP tower (see the module docstring)."""
    prefix = _vision_prefix(release)
    if prefix is None:
        return None
    try:
        vision = hf_clip.vision_config_from_hf(release.directory)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the release holds a CLIP image tower, {prefix}*)") from None
    if vision.hidden_size != projector.ecg_proj_dim:
        raise CheckpointError(
            f"{release.directory}/config.json: mm_vision_tower's hidden size {vision.hidden_size} "
            f"is not mm_hidden_size {projector.ecg_proj_dim} (GEM's mm_projector reads both)")
    return ml_collections.ConfigDict(vision.to_dict())


def model_config_from_release(release: _Release, tower_state: Mapping[str, np.ndarray],
                              param_dtype: str | None = None) -> ml_collections.ConfigDict:
    """The stage-1 `model` group a release describes (GEM's input layout; `ecg_lead_order` from
    the release when an export of ours wrote it; `vision_tower` when it holds a CLIP tower)."""
    llm = hf_llm.model_config_from_hf(release.directory)
    prefix = ecg_coca.detect_prefix(list(tower_state), ecg_coca.TOWER_PREFIXES, "conv1.weight")
    encoder = _encoder_config(tower_state, prefix or "", release.config)
    projector = _projector_config(release.config, int(llm.hidden_size))
    lead_order = release.config.get("ecg_lead_order", GEM_INPUT.ecg_lead_order)
    model = ml_collections.ConfigDict(dict(
        llm=llm, ecg_encoder=encoder, projector=projector,
        input=GEM_INPUT.replace(ecg_lead_order=lead_order).to_dict()))
    vision = _vision_config(release, projector)
    if vision is not None:
        model.vision_tower = vision
    if param_dtype:
        for group in MODEL_GROUPS:
            if group in model:
                model[group].param_dtype = param_dtype
    UniECGConfig.from_config(model)  # every field checked now, naming the group
    return model


# Numerics (and the tower freeze) a run chooses for itself; the rest of a group is the release's.
RUN_KEYS = ("param_dtype", "dtype", "remat", "scan_layers", "attention_query_chunk", "frozen")
MODEL_GROUPS = ("llm", "ecg_encoder", "projector", "vision_tower")


def merge_model_config(base: ml_collections.ConfigDict, release: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict:
    """`base` (a config file's `model` group) with the release's shapes, ids and input layout;
    the run's dtypes, remat, layer scanning and freezing (`RUN_KEYS`) are kept. A base without
    `vision_tower` (signal only) drops the release's image tower (its tensors are kept for
    export)."""
    merged = ml_collections.ConfigDict(release.to_dict())
    if "vision_tower" in merged and base.get("vision_tower") is None:
        del merged["vision_tower"]
    for group in MODEL_GROUPS:
        if group in base and group in merged and base[group] is not None:
            for key in RUN_KEYS:
                if key in base[group] and key in merged[group]:
                    merged[group][key] = base[group][key]
    return merged


def release_model_config(gem_dir: str, base: ml_collections.ConfigDict | None = None,
                         ecg_tower_ckpt: str | None = None) -> ml_collections.ConfigDict:
    """The stage-1 `model` group of a release (merged into `base` when given)."""
    release = open_release(gem_dir, ecg_tower_ckpt)
    model = model_config_from_release(release, release.tower_state()[0])
    return merge_model_config(base, model) if base is not None else model


# ----------------------------------------------------------------------------- importers
@dataclasses.dataclass
class _Target:
    """Where the importers put their results."""
    release: _Release
    config: UniECGConfig
    abstract: dict
    tower_state: dict
    tower_source: str
    params: dict = dataclasses.field(default_factory=dict)
    kept: dict = dataclasses.field(default_factory=dict)
    report: list = dataclasses.field(default_factory=list)


def _place(host: Any, abstract: Any) -> Any:
    """Host arrays -> arrays built shard by shard on the abstract tree's shardings."""
    return jax.tree.map(
        lambda value, target: jax.make_array_from_callback(
            target.shape, target.sharding,
            lambda index, value=np.asarray(value, target.dtype): value[index]),
        host, abstract)


def _import_llm(target: _Target, names: list[str]) -> None:
    target.params["llm"] = hf_llm.load_hf_params(
        target.release.directory, target.config.llm, target.abstract["llm"],
        reader=target.release.reader, tensor_names=names)
    target.report.append(f"LLM: {len(names)} tensors placed "
                         f"(vocab {target.config.llm.vocab_size}, unchanged)")


def _import_ecg_tower(target: _Target, names: list[str]) -> None:
    imported = ecg_coca.import_ecg_coca(target.tower_state, target.config.encoder,
                                        target.config.projector)
    if "projector" not in imported.params:
        raise CheckpointError(f"{target.release.directory}: missing tensor "
                              f"{PROJECTOR_PREFIX}ecg_projector.weight (GEM's projectors)")
    target.params["ecg_tower"] = _place(imported.params, target.abstract["ecg_tower"])
    released = set(names)
    target.kept.update({key: target.tower_state[key] for key in imported.skipped
                        if key in released})
    target.report.append(
        f"ECG tower ({target.tower_source}) and projectors placed; "
        f"{len(imported.skipped)} tower tensors unused by GEM's forward kept for export")


def _import_image_tower(target: _Target, names: list[str]) -> None:
    vision = target.config.vision
    prefix = _vision_prefix(target.release)
    if vision is not None and prefix is None:
        raise CheckpointError(f"{target.release.directory}: the model config has an image tower "
                              f"but the release holds none ({hf_clip.GEM_PREFIX}{hf_clip.ANCHOR} "
                              "missing)")
    if vision is None:
        target.kept.update({name: target.release.reader.get(name) for name in names})
        target.report.append(f"image tower: {len(names)} tensors ({IMAGE_TOWER_PREFIX}*) found "
                             "and NOT used (the model config has no model.vision_tower: signal "
                             "only); kept for export")
        return
    target.params["vision_tower"] = hf_clip.load_clip_vision(
        target.release.directory, vision, prefix=prefix, abstract=target.abstract["vision_tower"])
    placed = {prefix + name for _, _, name in hf_clip.leaf_rules(vision)}
    rest = [name for name in names if name not in placed]
    target.kept.update({name: target.release.reader.get(name) for name in rest})
    target.report.append(
        f"image tower: {len(placed)} tensors placed (CLIP {vision.image_size} px / patch "
        f"{vision.patch_size}, {vision.num_layers} layers, features of layer "
        f"{vision.select_layer}, {vision.num_tokens} tokens); {len(rest)} kept for export")


# Name prefix -> the importer of that tensor group (first match wins).
ROUTES: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.", "llm"), ("model.layers.", "llm"), ("model.norm.", "llm"),
    ("lm_head.", "llm"),
    ("model.ecg_tower.", "ecg_tower"), ("model.ecg_projector.", "ecg_tower"),
    ("model.mm_projector.", "ecg_tower"),
    ("model.vision_tower.", "image_tower"), ("model.image_newline", "image_tower"),
)
IMPORTERS: dict[str, Callable[[_Target, list[str]], None]] = {
    "llm": _import_llm, "ecg_tower": _import_ecg_tower, "image_tower": _import_image_tower}


def abstract_params_for(config: UniECGConfig, mesh=None) -> dict:
    """Abstract UniECG params with shardings on `mesh` (default: all devices on fsdp)."""
    mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    enc = config.encoder
    return sharding.abstract_sharded_params(
        UniECG(config), mesh, jnp.zeros((1, 8), jnp.int32),
        jnp.zeros((1, enc.num_leads, enc.num_samples)), jnp.zeros((1,), jnp.int32))


def import_gem(gem_dir: str, *, mesh=None, abstract_params: Any = None,
               param_dtype: str | None = None, ecg_tower_ckpt: str | None = None,
               model_config: Any = None) -> GemImport:
    """Imports a GEM release in one step.

    Args:
      gem_dir: the release directory (config.json + safetensors, single file or sharded).
      mesh / abstract_params: where the params go (default: all devices on the fsdp axis).
      param_dtype: dtype of the params (default: the configs' float32).
      ecg_tower_ckpt: ECG-CoCa `.pt` for a release without tower tensors (default: its
        `mm_ecg_tower`).
      model_config: a `model` group to import into (its shapes must match the release);
        default: derived from the release.
    Raises:
      CheckpointError naming the file and tensor: unplaced, missing or misshapen tensors.
    """
    release = open_release(gem_dir, ecg_tower_ckpt)
    tower_state, tower_source = release.tower_state()
    if model_config is None:
        model_config = model_config_from_release(release, tower_state, param_dtype)
    config = UniECGConfig.from_config(model_config)
    abstract = abstract_params if abstract_params is not None else abstract_params_for(config, mesh)
    target = _Target(release, config, abstract, tower_state, tower_source)
    groups = dict(release.groups)
    groups.setdefault("ecg_tower", [])  # a tower from the ECG-CoCa file still needs importing
    if config.vision is not None:
        groups.setdefault("image_tower", [])  # so that a missing tower is named
    for group, names in groups.items():
        IMPORTERS[group](target, names)
    if "llm" not in target.params:
        raise CheckpointError(f"{gem_dir}: no language-model tensors (model.layers.*)")
    return GemImport(target.params, model_config, target.kept, release.config, target.report)


def save_sidecar(directory: str, result: GemImport) -> None:
    """Keeps the release's config.json and its unused tensors inside a converted checkpoint
    (`<ckpt>/gem/`), for `export_gem`."""
    sidecar = os.path.join(directory, SIDECAR_DIR)
    os.makedirs(sidecar, exist_ok=True)
    with open(os.path.join(sidecar, SIDECAR_CONFIG), "w") as f:
        json.dump(result.gem_config, f, indent=2)
    save_file({k: np.ascontiguousarray(v) for k, v in result.kept.items()},
              os.path.join(sidecar, SIDECAR_TENSORS))


def load_sidecar(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(GEM config fields, kept tensors) of a checkpoint converted from GEM; empty otherwise."""
    sidecar = os.path.join(directory, SIDECAR_DIR)
    config, kept = {}, {}
    if os.path.isfile(os.path.join(sidecar, SIDECAR_CONFIG)):
        with open(os.path.join(sidecar, SIDECAR_CONFIG)) as f:
            config = json.load(f)
    if os.path.isfile(os.path.join(sidecar, SIDECAR_TENSORS)):
        with safe_open(os.path.join(sidecar, SIDECAR_TENSORS), framework="numpy") as f:
            kept = {name: f.get_tensor(name) for name in f.keys()}
    return config, kept


# ----------------------------------------------------------------------------- export
def gem_config_fields(config: UniECGConfig, base: Mapping[str, Any], ecg_tower_path: str,
                      vision_tower_path: str | None = None) -> dict:
    """GEM's config.json fields for our model, over `base` (a release's own fields, else the
    defaults of GEM's training script); with an image tower, its directory and feature selection."""
    projector = config.projector
    fields = {**GEM_DEFAULT_FIELDS, **{k: v for k, v in base.items()
                                       if k in GEM_DEFAULT_FIELDS or k.startswith("mm_")}}
    fields.update(
        model_type="llava_llama" if config.llm.family == "llama" else "llava_qwen",
        architectures=["LlavaLlamaForCausalLM" if config.llm.family == "llama"
                       else "LlavaQwenForCausalLM"],
        mm_ecg_tower=ecg_tower_path, ecg_projector_type="linear",
        mm_hidden_size=projector.ecg_proj_dim,
        mm_projector_type=f"mlp{projector.mm_projector_depth}x_gelu",
        # Ours, ignored by GEM's loader: what the next import needs to read the weights right.
        ecg_lead_order=config.input.ecg_lead_order, ecg_tower_heads=config.encoder.heads,
        uniecg_prompt_format=config.input.prompt_format)
    if config.vision is not None and vision_tower_path is not None:
        fields.update(mm_vision_tower=vision_tower_path,
                      mm_vision_select_layer=config.vision.select_layer,
                      mm_vision_select_feature=config.vision.select_feature)
        if config.vision.image_aspect_ratio == "pad" or fields["image_aspect_ratio"] == "pad":
            fields["image_aspect_ratio"] = config.vision.image_aspect_ratio
    return fields


def ecg_tower_tensors(params: Mapping[str, Any], config: UniECGConfig, dtype: Any
                      ) -> list[sharded_writer.ExportTensor]:
    """The ECG tower and GEM's projectors under GEM's names, one `HostTensor` per tensor (open_clip's
    fused in_proj joins three leaves): each host gathers one tensor's leaves when the writer
    reaches it (`convert.ecg_coca` rules, the one home of that layout)."""
    rules = (ecg_coca._encoder_rules(config.encoder, TOWER_PREFIX)
             + ecg_coca._projector_rules(config.projector, config.encoder.width, PROJECTOR_PREFIX))
    tower = params["ecg_tower"]
    tensors = []
    for rule in rules:
        try:
            leaves = [hf_llm._get_path(tower, path) for path in rule.flax_paths]
        except KeyError:
            raise CheckpointError(f"params have no leaf ecg_tower/{'/'.join(rule.flax_paths[0])} "
                                  f"(needed for {rule.torch_key})") from None

        def compute(rule=rule, leaves=leaves) -> np.ndarray:
            return rule.to_torch([sharded_writer.gather_to_host(leaf).astype(np.float32)
                                  for leaf in leaves])

        tensors.append(sharded_writer.ExportTensor(
            rule.torch_key, sharded_writer.HostTensor(rule.torch_shape, np.float32, compute),
            dtype=dtype))
    return tensors


def export_gem(params: Mapping[str, Any], model_config: Any, out_dir: str, *,
               tokenizer_dir: str | None = None, base_config: Mapping[str, Any] | None = None,
               kept: Mapping[str, np.ndarray] | None = None, dtype: Any = None,
               max_shard_size: int | str = "5GB", max_shard_bytes: int | None = None,
               progress: bool = False) -> str:
    """Writes a GEM release (see the module docstring): one safetensors plan with the LLM, the ECG
    tower and projectors, the CLIP tower (GEM's names) and the `kept` tensors (shards when larger
    than `max_shard_size`, HF semantics; `max_shard_bytes` overrides), config.json with GEM's
    fields, the ECG-CoCa `.pt` that `mm_ecg_tower` names and, with an image tower, the
    `CLIPVisionModel` directory that `mm_vision_tower` names. Call it on every host of a pod. A
    model with an `<ecg>` token (placeholder "token") keeps its grown vocabulary; one imported from
    GEM (sentinel placeholder) keeps GEM's."""
    config = model_config if isinstance(model_config, UniECGConfig) else UniECGConfig.from_config(
        model_config)
    np_dtype = np.dtype(dtype) if dtype is not None else np.dtype(config.llm.params_dtype)
    extra = ecg_tower_tensors(params, config, np_dtype)
    if config.vision is not None:
        extra += hf_clip.export_tensors(params["vision_tower"], config.vision, hf_clip.GEM_PREFIX,
                                        np_dtype)
    exported = {tensor.name for tensor in extra}
    clash = sorted(exported & set(kept or {}))
    if clash:
        raise CheckpointError(f"{out_dir}: kept tensors the model exports itself: {clash[:8]}")
    extra += [sharded_writer.ExportTensor(name, np.ascontiguousarray(tensor))
              for name, tensor in (kept or {}).items()]
    hf_llm.save_hf(params["llm"], config.llm, out_dir, tokenizer_dir=tokenizer_dir, dtype=np_dtype,
                   max_shard_size=max_shard_size, max_shard_bytes=max_shard_bytes,
                   progress=progress, extra_tensors=extra)
    vision_tower_path = None
    if config.vision is not None:
        vision_tower_path = os.path.abspath(os.path.join(out_dir, VISION_TOWER_DIR))
        hf_clip.save_clip_vision_hf(params["vision_tower"], config.vision, vision_tower_path,
                                    dtype=np_dtype)
    ecg_tower_path = os.path.abspath(os.path.join(out_dir, ECG_TOWER_FILE))
    if jax.process_index() != 0:
        return out_dir
    _write_ecg_coca_file(out_dir, config, ecg_tower_path)
    with open(os.path.join(out_dir, "config.json")) as f:
        hf_config = json.load(f)
    hf_config.update(gem_config_fields(config, base_config or {}, ecg_tower_path,
                                       vision_tower_path))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return out_dir


def _write_ecg_coca_file(out_dir: str, config: UniECGConfig, path: str) -> None:
    """Host 0: the ECG-CoCa `.pt` GEM's `CLIPECGTower` opens (`module.ecg.*`, float32), read back
    from the shards just written (the tower alone on the host, no collective)."""
    reader = hf_llm.SafetensorsDir(out_dir)
    coca = {"module.ecg." + name[len(TOWER_PREFIX):]: np.asarray(reader.get(name), np.float32)
            for name in reader.keys() if name.startswith(TOWER_PREFIX)}
    # GEM's get_ecg_encoder (ecg_coca/training/main.py) loads this file strictly, so the head that
    # GEM's forward never reaches must be there: a model that never had one gets a neutral one.
    width = config.encoder.width
    coca.setdefault("module.ecg.ln_post.weight", np.ones(width, np.float32))
    coca.setdefault("module.ecg.ln_post.bias", np.zeros(width, np.float32))
    coca.setdefault("module.ecg.proj", np.zeros((width, COCA_EMBED_DIM), np.float32))
    ecg_coca.save_state_dict(coca, path)
