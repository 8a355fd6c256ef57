"""DiffuSETS PyTorch checkpoints <-> our Flax VAE and UNet.

DiffuSETS saves the VAE as `{"encoder": state_dict, "decoder": state_dict}` (`nn.Sequential` indices,
e.g. `decoder.2.conv_1.weight`) and the UNet (`ECGconditional`) as one state dict
(`downsampling_blocks.0.block.self_attention.attention.in_proj_weight`, ...). The mapping is
declarative: a Flax parameter path is renamed component by component (`_UNET_RENAMES`, the VAE plan
index for the VAE) and reshaped by its kind: Linear `[out, in]` <-> `[in, out]`; Conv1d
`[out, in, width]` <-> `[width, in, out]`; ConvTranspose1d `[in, out, width]` <-> `[width, in, out]`;
`nn.MultiheadAttention.in_proj_*` split into q/k/v. Every tensor is checked against the abstract Flax
tree; errors name the tensor. Tensors DiffuSETS defines but never uses in `forward` (the `down` conv
inside every UNet `Block`, the VAE attention `groupnorm`) are skipped on import and written with
PyTorch's default-free values (zeros / ones) on export, so `load_state_dict(strict=True)` works.

"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from uniecg_jax.errors import CheckpointError
from uniecg_jax.models.unet import UNetConfig, abstract_unet_params, timestep_table
from uniecg_jax.models.vae import VAEConfig, abstract_vae_params, decoder_plan, encoder_plan

# Flax module name -> DiffuSETS attribute name, per enclosing module kind.
_UNET_TOP = [
    (r"down_(\d+)", r"downsampling_blocks.\1.block"),
    (r"downsample_(\d+)", r"downsampling_blocks.\1.down"),
    (r"up_(\d+)", r"upsampling_blocks.\1.block"),
    (r"upsample_(\d+)", r"upsampling_blocks.\1.up"),
    (r"bottleneck", "bottelneck"),  # sic: DiffuSETS's attribute name
    (r"output_conv", "output_conv.0"),
    (r"output_proj", "output_conv.2"),
]
_UNET_RENAMES = {
    "block": {"pre_shortcut_conv": "pre_shortcut_convs", "shortcut_conv": "shortcut_convs",
              "post_shortcut_conv": "post_shortcut_convs", "norm1": "layer_norm1",
              "norm2": "layer_norm2"},
    "bottleneck": {"conv1": "bottleneck_conv1", "conv1_2": "bottleneck_conv1_2",
                   "conv2": "bottleneck_conv2", "norm1": "bottleneck_layer_norm1",
                   "norm2": "bottleneck_layer_norm2"},
    "cross_attention": {"norm": "normalization", "condition_norm": "condition_normalization"},
}
_VAE_RENAMES = {"norm1": "groupnorm_1", "conv1": "conv_1", "norm2": "groupnorm_2",
                "conv2": "conv_2", "skip": "residual_layer", "qkv_proj": "attention.in_proj",
                "out_proj": "attention.out_proj"}
_IN_PROJ_INDEX = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor, dtype=np.float32)


def _unet_torch_module(path: tuple[str, ...]) -> str | None:
    """Flax module path (without leaf) -> DiffuSETS module key, or None (no counterpart)."""
    if not path:
        return None  # top-level parameters (null_condition) have no DiffuSETS counterpart
    top = path[0]
    for pattern, repl in _UNET_TOP:
        if re.fullmatch(pattern, top):
            parts = [re.sub(pattern, repl, top)]
            break
    else:
        return None
    scope = "bottleneck" if top == "bottleneck" else "block"
    for name in path[1:]:
        if name in ("self_attention", "cross_attention"):
            scope = name
        parts.append(_UNET_RENAMES.get(scope, {}).get(name, name))
    return ".".join(parts)


def _vae_torch_module(path: tuple[str, ...], cfg: VAEConfig) -> str:
    part, name = path[0], path[1]
    plan = encoder_plan(cfg) if part == "encoder" else decoder_plan(cfg)
    index = [step.name for step in plan].index(name)
    return ".".join([part, str(index)] + [_VAE_RENAMES.get(p, p) for p in path[2:]])


def _entries(flat_abstract: Mapping[tuple, Any], module_fn) -> list[tuple[tuple, str, str]]:
    """(flax path, torch key, kind) for every Flax leaf that has a DiffuSETS counterpart."""
    entries = []
    for path, leaf in flat_abstract.items():
        module, leaf_name = path[:-1], path[-1]
        torch_module = module_fn(module)
        if torch_module is None:
            continue
        if len(module) >= 2 and module[-1] in _IN_PROJ_INDEX and module[-2] == "attention":
            base = torch_module.rsplit(".", 1)[0]
            suffix = "in_proj_weight" if leaf_name == "kernel" else "in_proj_bias"
            entries.append((path, f"{base}.{suffix}", f"in_proj{_IN_PROJ_INDEX[module[-1]]}"))
            continue
        torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf_name]
        if leaf_name != "kernel":
            kind = "vector"
        elif len(leaf.shape) == 2:
            kind = "linear"
        elif module[-1].startswith("upsample"):
            kind = "conv_transpose"
        else:
            kind = "conv"
        entries.append((path, f"{torch_module}.{torch_leaf}", kind))
    return entries


# Flax axis order -> PyTorch axis order for each tensor kind (vectors unchanged).
_TO_TORCH_AXES = {"linear": (1, 0), "conv": (2, 1, 0), "conv_transpose": (1, 2, 0)}


def _from_torch_layout(tensor: np.ndarray, kind: str) -> np.ndarray:
    axes = _TO_TORCH_AXES.get(kind)
    return tensor if axes is None else tensor.transpose(np.argsort(axes))


def _to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    axes = _TO_TORCH_AXES.get(kind)
    return array if axes is None else array.transpose(axes)


def _import(state: Mapping[str, Any], abstract: Any, module_fn, unused: re.Pattern, what: str,
            defaults: Mapping[tuple, np.ndarray] = ()) -> dict:
    flat_abstract = traverse_util.flatten_dict(abstract)
    entries = _entries(flat_abstract, module_fn)
    state = {k: _to_numpy(v) for k, v in state.items()}
    used, flat = set(), {}
    for path, key, kind in entries:
        expected = tuple(flat_abstract[path].shape)
        if key not in state:
            raise CheckpointError(f"{what}: missing tensor {key!r} (needed for {'/'.join(path)}, "
                                  f"shape {expected})")
        tensor = state[key]
        if kind.startswith("in_proj"):
            which = int(kind[-1])
            if tensor.shape[0] % 3:
                raise CheckpointError(f"{what}: {key} has shape {tensor.shape}; expected 3 x rows")
            rows = tensor.shape[0] // 3
            tensor = tensor[which * rows:(which + 1) * rows]
            tensor = tensor.T if tensor.ndim == 2 else tensor
        else:
            tensor = _from_torch_layout(tensor, kind)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{what}: tensor {key!r} has shape {tuple(state[key].shape)}, which maps to "
                f"{tuple(tensor.shape)} but {'/'.join(path)} expects {expected} ({kind}); "
                f"check the model config (widths, levels, text_embed_dim)")
        used.add(key)
        flat[path] = jnp.asarray(tensor, dtype=flat_abstract[path].dtype)
    for path, value in dict(defaults).items():
        flat[path] = jnp.asarray(value, dtype=flat_abstract[path].dtype)
    leftover = sorted(k for k in state if k not in used and not unused.search(k))
    if leftover:
        raise CheckpointError(f"{what}: unexpected tensors {leftover[:5]}"
                              f"{' ...' if len(leftover) > 5 else ''} (not part of this model)")
    missing = sorted("/".join(p) for p in flat_abstract if p not in flat)
    if missing:
        raise CheckpointError(f"{what}: no source for Flax parameters {missing[:5]}")
    return traverse_util.unflatten_dict(flat)


_UNET_UNUSED = re.compile(r"(^|\.)block\.down\.(weight|bias)$|time_emb\.embeddings$")
_VAE_UNUSED = re.compile(r"\.groupnorm\.(weight|bias)$")


def unet_from_torch(state_dict: Mapping[str, Any], cfg: UNetConfig) -> dict:
    """DiffuSETS `ECGconditional` state dict -> `{"params": ...}` for `ConditionalUNet(cfg)`.

    The fixed timestep tables (`*.time_emb.embeddings`) must equal DiffuSETS's closed form for
    `cfg.num_train_steps`; `null_condition` (ours, for guidance) starts at zero.
    """
    table = timestep_table(cfg.num_train_steps, cfg.time_embed_dim)
    for key, tensor in state_dict.items():
        if key.endswith("time_emb.embeddings"):
            tensor = _to_numpy(tensor)
            if tensor.shape != table.shape or not np.allclose(tensor, table, atol=1e-4):
                raise CheckpointError(
                    f"unet: {key} (shape {tensor.shape}) differs from the sinusoidal table for "
                    f"{cfg.num_train_steps} steps x {cfg.time_embed_dim} (diffusion.num_steps?)")
    abstract = abstract_unet_params(cfg)
    params = _import(state_dict, abstract, _unet_torch_module, _UNET_UNUSED, "unet",
                     defaults={("null_condition",): np.zeros(cfg.condition_dim)})
    return {"params": params}


def unet_to_torch(variables: Mapping[str, Any], cfg: UNetConfig) -> dict[str, np.ndarray]:
    """`{"params": ...}` -> DiffuSETS `ECGconditional` state dict (numpy float32 arrays)."""
    flat = traverse_util.flatten_dict(variables["params"])
    state = {}
    for path, key, kind in _entries(flat, _unet_torch_module):
        array = np.asarray(flat[path], dtype=np.float32)
        if kind.startswith("in_proj"):
            array = array.T if array.ndim == 2 else array
            state.setdefault(key, {})[int(kind[-1])] = array
        else:
            state[key] = _to_torch_layout(array, kind)
    for key, value in list(state.items()):
        if isinstance(value, dict):
            state[key] = np.concatenate([value[i] for i in range(3)], axis=0)
    table = timestep_table(cfg.num_train_steps, cfg.time_embed_dim)
    for key in [k for k in state if k.endswith("time_emb.fc1.weight")]:
        state[key.replace("fc1.weight", "embeddings")] = table
    # DiffuSETS's Block owns an unused stride-2 conv (`block.down`); zeros keep strict loading.
    for key in [k for k in state if re.search(r"block\.post_shortcut_convs\.weight$", k)]:
        channels = state[key].shape[0]
        prefix = key.replace("post_shortcut_convs.weight", "down")
        state[prefix + ".weight"] = np.zeros((channels, channels, 3), np.float32)
        state[prefix + ".bias"] = np.zeros((channels,), np.float32)
    return state


def vae_from_torch(checkpoint: Mapping[str, Any], cfg: VAEConfig) -> dict:
    """DiffuSETS VAE checkpoint -> `{"params": ...}` for `VAE(cfg)`.

    Accepts `{"encoder": sd, "decoder": sd}` (DiffuSETS's file), a flat dict with `encoder.`/
    `decoder.` prefixes, or a decoder-only `{"decoder": sd}` (then only `params["decoder"]`).
    """
    flat_state = {}
    for part in ("encoder", "decoder"):
        if part in checkpoint and isinstance(checkpoint[part], Mapping):
            flat_state.update({f"{part}.{k}": v for k, v in checkpoint[part].items()})
    if not flat_state:
        flat_state = dict(checkpoint)
    abstract = abstract_vae_params(cfg)
    parts = [p for p in ("encoder", "decoder") if any(k.startswith(p + ".") for k in flat_state)]
    if not parts:
        raise CheckpointError("vae: checkpoint has neither 'encoder' nor 'decoder' tensors")
    abstract = {p: abstract[p] for p in parts}
    params = _import(flat_state, abstract, lambda path: _vae_torch_module(path, cfg), _VAE_UNUSED,
                     "vae")
    return {"params": params}


def vae_to_torch(variables: Mapping[str, Any], cfg: VAEConfig) -> dict[str, dict[str, np.ndarray]]:
    """`{"params": ...}` -> `{"encoder": state_dict, "decoder": state_dict}` (DiffuSETS layout)."""
    flat = traverse_util.flatten_dict(variables["params"])
    out: dict[str, dict[str, np.ndarray]] = {}
    for path, key, kind in _entries(flat, lambda path: _vae_torch_module(path, cfg)):
        part, rest = key.split(".", 1)
        out.setdefault(part, {})[rest] = _to_torch_layout(np.asarray(flat[path], np.float32), kind)
    for part, plan in (("encoder", encoder_plan(cfg)), ("decoder", decoder_plan(cfg))):
        for index, step in enumerate(plan):
            if step.kind == "attn" and part in out:  # defined but unused by DiffuSETS's forward
                out[part][f"{index}.groupnorm.weight"] = np.ones(step.in_channels, np.float32)
                out[part][f"{index}.groupnorm.bias"] = np.zeros(step.in_channels, np.float32)
    return out


def load_torch_file(path: str) -> Any:
    """`torch.load` a DiffuSETS `.pth` on CPU (tensors only); errors name the file."""
    import torch  # optional extra (`uniecg_jax[torch]`), only to read DiffuSETS .pth files
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # corrupt / not a torch file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint: {e}") from None


# The text encoders DiffuSETS's weights were trained with, by the UNet's text width
# (PKUDigitalHealth/DiffuSETS b610a00): utils/text_to_emb.py posts `prompt_propcess(text)` to an
# OpenAI-compatible /v1/embeddings service, model "E-72B" at kidneytalk.bjmu.edu.cn with no key
# (8192-d; DiffuSETS_train.py builds the UNet with text_embed_dim=8192); the paper's experiments
# used OpenAI's text-embedding-ada-002 (1536-d). Both read the DiffuSETS prompt template.
DIFFUSETS_TEXT_ENCODERS = {
    8192: ("endpoint:E-72B@https://kidneytalk.bjmu.edu.cn/api/v1", ""),
    1536: ("endpoint:text-embedding-ada-002@https://api.openai.com/v1", "OPENAI_API_KEY"),
}


def text_settings_for_width(width: int) -> dict | None:
    """`config.text` values (encoder, template, endpoint.api_key_env) that give `width`-d
    embeddings as DiffuSETS's weights of that width expect, or None for an unknown width."""
    if width not in DIFFUSETS_TEXT_ENCODERS:
        return None
    encoder, key_env = DIFFUSETS_TEXT_ENCODERS[width]
    return {"encoder": encoder, "template": "diffusets", "endpoint.api_key_env": key_env}
