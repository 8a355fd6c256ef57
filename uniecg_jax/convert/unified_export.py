"""Hugging Face export of the whole unified model, and the loader that rebuilds it.

    export_unified("/tmp/stage2", "/tmp/uniecg_hf", diffusion="/tmp/diffusion")
    unified = load_unified_export("/tmp/uniecg_hf")        # a UnifiedModel (+ diffusion pipeline)

Layout of the export directory:
    llm/                        LlamaForCausalLM / Qwen2ForCausalLM dir (`hf_llm.save_hf`): config,
                                safetensors and the tokenizer WITH the [ECG] tokens (rows included)
    ecg_tower.safetensors       ECG encoder + ecg_projector + mm_projector ("encoder.blocks_0...")
    alignment.safetensors       the alignment head
    attributes.safetensors,     the attribute head and the decision read-out (models with them)
    decision.safetensors
    diffusion_vae.safetensors,  the diffusion model (when exported with one)
    diffusion_unet.safetensors
    uniecg_config.json          {"format", "stage2_config": <full config>, "ecg_token_ids",
                                 "components": {name: file}, "diffusion_config": <config> | null}
Tensor names are the Flax param paths joined by "."; every tensor is checked against the abstract
Flax tree on load (a CheckpointError names any missing, unexpected or wrong-shaped one).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file

from uniecg_jax.checkpoint import tokenizer_path
from uniecg_jax.config import config_to_json
from uniecg_jax.convert.hf_llm import load_hf_params, save_hf
from uniecg_jax.convert.sharded_writer import ExportTensor, write_safetensors
from uniecg_jax.data.tokenizer import load_tokenizer
from uniecg_jax.diffusion.pipeline import DiffusionPipeline, load_pipeline
from uniecg_jax.errors import CheckpointError
from uniecg_jax.inference.chat import UnifiedModel, load_diffusion
from uniecg_jax.inference.interpret import resolve_model_dir
from uniecg_jax.layers.params import path_name
from uniecg_jax.models.stage2 import abstract_stage2_params, build_stage2
from uniecg_jax.models.unet import UNetConfig, abstract_unet_params
from uniecg_jax.models.vae import VAEConfig, abstract_vae_params
from uniecg_jax.sharding import make_mesh

FORMAT = "uniecg-unified-v1"
CONFIG_FILE = "uniecg_config.json"
LLM_DIR = "llm"
# attributes / decision: only models with that head (`model.attributes` / `model.decision`).
COMPONENTS = {"ecg_tower": "ecg_tower.safetensors", "alignment": "alignment.safetensors",
              "attributes": "attributes.safetensors", "decision": "decision.safetensors"}
DIFFUSION_COMPONENTS = {"vae": "diffusion_vae.safetensors", "unet": "diffusion_unet.safetensors"}


def flatten_params(tree: Any) -> dict[str, np.ndarray]:
    """Nested params -> {"a.b.kernel": float array} (host copies)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[path_name(path, ".")] = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    return flat


def unflatten_params(flat: dict[str, np.ndarray], abstract: Any, what: str) -> Any:
    """{"a.b.kernel": array} -> the tree of `abstract` (ShapeDtypeStructs), shapes checked."""
    wanted = flatten_params(jax.tree.map(lambda x: np.zeros((), np.int8), abstract))
    missing = sorted(set(wanted) - set(flat))
    unexpected = sorted(set(flat) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing tensors {missing[:6]}, unexpected {unexpected[:6]}")

    def take(path, target):
        name = path_name(path, ".")
        value = flat[name]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{what}: tensor {name} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(target.shape)}")
        return jax.numpy.asarray(value, dtype=target.dtype)
    return jax.tree_util.tree_map_with_path(take, abstract)


def _save(tree: Any, out_dir: str, filename: str) -> None:
    """One component file from every host (`convert.sharded_writer`: each host writes the slices
    it holds, one tensor's block on the host at a time)."""
    tensors = [ExportTensor(path_name(path, "."), leaf)
               for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    write_safetensors(tensors, out_dir, prefix=filename[:-len(".safetensors")],
                      max_shard_size=None, metadata={"format": "flax"}, progress=False)


def _load(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    return load_file(path)


def export_unified(ckpt: str, out_dir: str, diffusion: Any = None, dtype: Any = None,
                   max_shard_size: int | str = "5GB", mesh=None) -> str:
    """Writes the export directory (see module docstring). Run the same call on every host of a
    pod (after `jax.distributed.initialize()`): the stage-2 params are restored fsdp-sharded over
    every device of every host and each host writes the slices it holds, so no host ever holds
    the whole model (host 0 writes the manifest and the index files).

    Args:
      ckpt: stage-2 train workdir or model dir.
      diffusion: a diffusion model dir, or `(DiffusionPipeline, diffusion config)`, or None.
      dtype: LLM tensor dtype in the HF dir (default: the param dtype).
      max_shard_size: the HF LLM's safetensors shard size (HF semantics, "5GB" = 5e9 bytes).
      mesh: where the params are restored (default: all devices on the fsdp axis).
    """
    directory = resolve_model_dir(ckpt)
    mesh = mesh or make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    unified = UnifiedModel.load(directory, mesh=mesh)
    os.makedirs(out_dir, exist_ok=True)
    save_hf(unified.params["llm"], unified.model.config.unified.llm, os.path.join(out_dir, LLM_DIR),
            tokenizer_dir=tokenizer_path(directory), dtype=dtype, max_shard_size=max_shard_size)
    components = {name: filename for name, filename in COMPONENTS.items()
                  if name in unified.params}
    for name, filename in components.items():
        _save(unified.params[name], out_dir, filename)
    diffusion_config = None
    if diffusion is not None:
        if isinstance(diffusion, str):
            diffusion = load_pipeline(diffusion)
        pipeline, diffusion_config = diffusion
        _save(pipeline.vae_params["params"], out_dir, DIFFUSION_COMPONENTS["vae"])
        _save(pipeline.unet_params["params"], out_dir, DIFFUSION_COMPONENTS["unet"])
    if jax.process_index() != 0:
        return out_dir
    manifest = {
        "format": FORMAT, "llm_dir": LLM_DIR,
        "llm_architecture": {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
            unified.model.config.unified.llm.family],
        "ecg_token_ids": list(unified.ecg_token_ids),
        "ecg_tokens": [unified.tokenizer.convert_ids_to_tokens(i) for i in unified.ecg_token_ids],
        "components": dict(components, **(DIFFUSION_COMPONENTS if diffusion_config else {})),
        "stage2_config": json.loads(config_to_json(unified.config)),
        "diffusion_config": json.loads(config_to_json(diffusion_config)) if diffusion_config
        else None}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    return out_dir


def load_unified_export(out_dir: str):
    """Rebuilds the `UnifiedModel` (with its DiffusionPipeline when exported) from `out_dir`."""
    path = os.path.join(out_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; {out_dir} is not a unified export")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    config = ml_collections.ConfigDict(manifest["stage2_config"])
    model, s2cfg = build_stage2(config.model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_stage2_params(model, device)
    llm_dir = os.path.join(out_dir, manifest["llm_dir"])
    params = {"llm": load_hf_params(llm_dir, s2cfg.unified.llm, abstract["llm"])}
    for name, filename in COMPONENTS.items():
        if name not in abstract:
            continue
        params[name] = unflatten_params(_load(os.path.join(out_dir, filename)), abstract[name],
                                        os.path.join(out_dir, filename))
    tokenizer = load_tokenizer(llm_dir)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in manifest["ecg_tokens"]]
    if ids != list(s2cfg.ecg_token_ids):
        raise CheckpointError(f"{llm_dir}: tokenizer maps {manifest['ecg_tokens']} to {ids}, the "
                              f"model expects {list(s2cfg.ecg_token_ids)}")
    diffusion = None
    if manifest.get("diffusion_config"):
        diffusion_config = ml_collections.ConfigDict(manifest["diffusion_config"])
        diffusion = (_load_diffusion(out_dir, diffusion_config), diffusion_config)
    config.lock()
    return UnifiedModel(model, params, tokenizer, config, *load_diffusion(diffusion))


def _load_diffusion(out_dir: str, config):
    unet_cfg = UNetConfig.from_config(config.model.unet, config.diffusion.num_steps)
    abstract = {"unet": abstract_unet_params(unet_cfg),
                "vae": abstract_vae_params(VAEConfig.from_config(config.model.vae),
                                           int(config.data.signal_length))}
    loaded = {name: unflatten_params(_load(os.path.join(out_dir, filename)), abstract[name],
                                     os.path.join(out_dir, filename))
              for name, filename in DIFFUSION_COMPONENTS.items()}
    return DiffusionPipeline.from_config(config, {"params": loaded["vae"]},
                                         {"params": loaded["unet"]})
