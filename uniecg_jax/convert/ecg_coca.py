"""ECG-CoCa / open_clip PyTorch checkpoints <-> `ECGTower` params (both directions).

Source key layouts understood (the ECG tower prefix is detected, or pass `prefix=`):
  ECG-CoCa training checkpoint  `{"state_dict": {"module.ecg.conv1.weight", ...}}` (what GEM loads)
  plain open_clip model          `ecg.conv1.weight` / `visual.conv1.weight`
  a GEM / LLaVA model            `model.ecg_tower.ecg_tower.conv1.weight`
GEM's projectors, when present: `model.ecg_projector.{weight,bias}` (linear) and
`model.mm_projector.{0,2}.{weight,bias}` (mlp2x_gelu; the `model.` prefix is optional).

The conversion is a declarative table (`_rules`): torch key, expected torch shape (from the config),
the Flax leaf paths it fills and a pair of per-tensor hooks (transpose, q/k/v split + head reshape).
Every tensor is checked against the table and every produced leaf against the abstract Flax tree
(`jax.eval_shape` of init); a mismatch raises `CheckpointError` naming the file and tensor.

Tower keys GEM never uses for the LLM input (`ln_post`, `proj`, attentional poolers) are skipped and
listed in `ImportResult.skipped`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.errors import CheckpointError
from uniecg_jax.layers.params import abstract_module_params
from uniecg_jax.models.ecg_encoder import (ECGEncoder, ECGEncoderConfig, ECGProjector,
                                           ProjectorConfig)

TOWER_PREFIXES = ("module.ecg.", "ecg.", "visual.", "model.ecg_tower.ecg_tower.",
                  "ecg_tower.ecg_tower.", "model.ecg_tower.", "")
PROJECTOR_PREFIXES = ("model.", "")
# Present in ECG-CoCa towers but unused by GEM's `output_last_transformer_layer=True` forward.
UNUSED_TOWER_KEYS = ("ln_post.", "proj", "attn_pool.", "attn_pool_contrastive.")
# First key components of the tower's own tensors (to tell tower keys apart when the prefix is "").
TOWER_ROOTS = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "transformer.")

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One torch tensor <-> one or more Flax leaves."""
    torch_key: str
    torch_shape: tuple[int, ...]
    flax_paths: tuple[Path, ...]
    to_flax: Callable[[np.ndarray], list[np.ndarray]]
    to_torch: Callable[[list[np.ndarray]], np.ndarray]


def _identity_rule(key: str, shape: tuple[int, ...], path: Path) -> _Rule:
    return _Rule(key, shape, (path,), lambda t: [t], lambda leaves: leaves[0])


def _linear_rules(key: str, in_dim: int, out_dim: int, path: Path) -> list[_Rule]:
    """torch Linear weight [out, in] <-> Flax kernel [in, out]; bias as is."""
    return [
        _Rule(f"{key}.weight", (out_dim, in_dim), (path + ("kernel",),),
              lambda t: [t.T], lambda leaves: leaves[0].T),
        _identity_rule(f"{key}.bias", (out_dim,), path + ("bias",)),
    ]


def _layer_norm_rules(key: str, width: int, path: Path) -> list[_Rule]:
    return [_identity_rule(f"{key}.weight", (width,), path + ("scale",)),
            _identity_rule(f"{key}.bias", (width,), path + ("bias",))]


def _encoder_rules(cfg: ECGEncoderConfig, prefix: str) -> list[_Rule]:
    width, heads, head_dim = cfg.width, cfg.heads, cfg.head_dim
    enc: Path = ("encoder",)
    rules = [
        # Conv1d weight [out=width, in=leads, window] <-> kernel [window, leads, width].
        _Rule(f"{prefix}conv1.weight", (width, cfg.num_leads, cfg.patch_size),
              (enc + ("conv1", "kernel"),),
              lambda t: [t.transpose(2, 1, 0)], lambda leaves: leaves[0].transpose(2, 1, 0)),
        _identity_rule(f"{prefix}class_embedding", (width,), enc + ("class_embedding",)),
        _identity_rule(f"{prefix}positional_embedding", (cfg.num_tokens, width),
                       enc + ("positional_embedding",)),
        *_layer_norm_rules(f"{prefix}ln_pre", width, enc + ("ln_pre",)),
    ]

    def split_in_proj_weight(t: np.ndarray) -> list[np.ndarray]:
        # in_proj_weight stacks q, k, v rows: [3 * width (out), width (in)].
        return [part.T.reshape(width, heads, head_dim) for part in np.split(t, 3, axis=0)]

    def join_in_proj_weight(leaves: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([leaf.reshape(width, width).T for leaf in leaves], axis=0)

    def split_in_proj_bias(t: np.ndarray) -> list[np.ndarray]:
        return [part.reshape(heads, head_dim) for part in np.split(t, 3)]

    def join_in_proj_bias(leaves: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([leaf.reshape(width) for leaf in leaves])

    for index in range(cfg.layers):
        key = f"{prefix}transformer.resblocks.{index}"
        block: Path = enc + (f"resblocks_{index}",)
        attn = block + ("attn",)
        qkv = lambda leaf: tuple(attn + (name, leaf) for name in ("query", "key", "value"))  # noqa: E731
        rules += [
            *_layer_norm_rules(f"{key}.ln_1", width, block + ("ln_1",)),
            _Rule(f"{key}.attn.in_proj_weight", (3 * width, width), qkv("kernel"),
                  split_in_proj_weight, join_in_proj_weight),
            _Rule(f"{key}.attn.in_proj_bias", (3 * width,), qkv("bias"),
                  split_in_proj_bias, join_in_proj_bias),
            # out_proj weight [width (out), width (in = heads * head_dim)] <-> [heads, head_dim, width].
            _Rule(f"{key}.attn.out_proj.weight", (width, width), (attn + ("out", "kernel"),),
                  lambda t: [t.T.reshape(heads, head_dim, width)],
                  lambda leaves: leaves[0].reshape(width, width).T),
            _identity_rule(f"{key}.attn.out_proj.bias", (width,), attn + ("out", "bias")),
            *_layer_norm_rules(f"{key}.ln_2", width, block + ("ln_2",)),
            *_linear_rules(f"{key}.mlp.c_fc", width, cfg.mlp_dim, block + ("c_fc",)),
            *_linear_rules(f"{key}.mlp.c_proj", cfg.mlp_dim, width, block + ("c_proj",)),
        ]
    return rules


def _projector_rules(cfg: ProjectorConfig, ecg_width: int, prefix: str) -> list[_Rule]:
    proj: Path = ("projector",)
    rules = _linear_rules(f"{prefix}ecg_projector", ecg_width, cfg.ecg_proj_dim,
                          proj + ("ecg_projector",))
    in_dim = cfg.ecg_proj_dim
    for index in range(cfg.mm_projector_depth):
        # torch nn.Sequential(Linear, GELU, Linear, ...): linears sit at even indices.
        rules += _linear_rules(f"{prefix}mm_projector.{2 * index}", in_dim, cfg.llm_hidden_size,
                               proj + ("mm_projector", f"fc_{index}"))
        in_dim = cfg.llm_hidden_size
    return rules


@dataclasses.dataclass
class ImportResult:
    """params: {"encoder": ..., ["projector": ...]} as numpy arrays in the model's param dtype;
    skipped: checkpoint keys deliberately not imported; tower_prefix / projector_prefix: as found."""
    params: dict
    skipped: list[str]
    tower_prefix: str
    projector_prefix: str | None


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
    """A state dict (mapping) or a .pt/.pth/.bin/.safetensors file -> ({key: np.ndarray}, label).

    A `{"state_dict": ...}` wrapper (open_clip training checkpoints) is unwrapped."""
    if isinstance(source, Mapping):
        state, label = source, "<state dict>"
    else:
        label = os.fspath(source)
        if not os.path.isfile(label):
            raise CheckpointError(f"{label}: checkpoint file not found")
        try:
            if label.endswith(".safetensors"):
                from safetensors.torch import load_file  # torch: optional extra, only here
                state = load_file(label)
            else:
                import torch
                state = torch.load(label, map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad checkpoint file
            raise CheckpointError(f"{label}: cannot read checkpoint: {e}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{label}: expected a state dict (key -> tensor), got {type(state).__name__}")
    return {str(k): _to_numpy(v, k, label) for k, v in state.items()}, label


def _to_numpy(value: Any, key: str, label: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor; bf16 has no numpy dtype, so go through float32
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{label}: tensor {key!r} is not an array: {e}") from None


def detect_prefix(keys: Sequence[str], candidates: Sequence[str], anchor: str) -> str | None:
    """The first candidate prefix under which `anchor` is a key, else None."""
    for prefix in candidates:
        if prefix + anchor in keys:
            return prefix
    return None


def abstract_params(encoder_config: ECGEncoderConfig,
                    projector_config: ProjectorConfig | None = None) -> dict:
    """Shapes/dtypes of `ECGTower` params ({"encoder", ["projector"]}) without allocating them."""
    cfg = encoder_config
    tree = {"encoder": abstract_module_params(
        ECGEncoder(cfg), jax.ShapeDtypeStruct((1, cfg.num_leads, cfg.num_samples), jnp.float32))}
    if projector_config is not None:
        tree["projector"] = abstract_module_params(
            ECGProjector(projector_config),
            jax.ShapeDtypeStruct((1, cfg.num_tokens, cfg.width), jnp.float32))
    return tree


def _leaf(tree: dict, path: Path) -> Any:
    node = tree
    for part in path:
        node = node[part]
    return node


def _set_leaf(tree: dict, path: Path, value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _describe(cfg: ECGEncoderConfig) -> str:
    return (f"width={cfg.width}, layers={cfg.layers}, heads={cfg.heads}, patch_size={cfg.patch_size}, "
            f"num_samples={cfg.num_samples}, num_leads={cfg.num_leads}, mlp_ratio={cfg.mlp_ratio}")


def import_ecg_coca(source: str | os.PathLike | Mapping[str, Any],
                    encoder_config: ECGEncoderConfig,
                    projector_config: ProjectorConfig | None = None, *,
                    prefix: str | None = None, strict: bool = True) -> ImportResult:
    """Converts an ECG-CoCa / GEM PyTorch checkpoint into `ECGTower` params.

    Args:
      source: a state dict or a checkpoint file (.pt/.pth/.bin/.safetensors).
      encoder_config: the tower shape the checkpoint must match.
      projector_config: when given, GEM's `ecg_projector`/`mm_projector` keys are imported too (if the
        checkpoint has none, `params` has no "projector" entry and the caller keeps its own init).
      prefix: the tower key prefix (default: detected among `TOWER_PREFIXES`).
      strict: unknown keys under the tower prefix are an error (else they are skipped).
    Raises:
      CheckpointError naming the file and tensor on a missing key, a wrong shape or an unknown key.
    """
    state, label = load_state_dict(source)
    keys = list(state)
    if prefix is None:
        prefix = detect_prefix(keys, TOWER_PREFIXES, "conv1.weight")
        if prefix is None:
            raise CheckpointError(
                f"{label}: no ECG tower found: none of "
                f"{[p + 'conv1.weight' for p in TOWER_PREFIXES]} is in the checkpoint "
                f"(first keys: {keys[:5]})")
    rules = _encoder_rules(encoder_config, prefix)

    projector_prefix = None
    if projector_config is not None:
        projector_prefix = detect_prefix(keys, PROJECTOR_PREFIXES, "ecg_projector.weight")
        if projector_prefix is not None:
            rules += _projector_rules(projector_config, encoder_config.width, projector_prefix)

    abstract = abstract_params(encoder_config,
                               projector_config if projector_prefix is not None else None)
    params: dict = {}
    used = set()
    for rule in rules:
        if rule.torch_key not in state:
            raise CheckpointError(f"{label}: missing tensor {rule.torch_key!r} (model: "
                                  f"{_describe(encoder_config)})")
        tensor = state[rule.torch_key]
        if tuple(tensor.shape) != rule.torch_shape:
            raise CheckpointError(
                f"{label}: tensor {rule.torch_key!r} has shape {tuple(tensor.shape)}, the model "
                f"expects {rule.torch_shape} ({_describe(encoder_config)})")
        used.add(rule.torch_key)
        for path, value in zip(rule.flax_paths, rule.to_flax(tensor), strict=True):
            target = _leaf(abstract, path)
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{label}: tensor {rule.torch_key!r} converts to {value.shape} but Flax leaf "
                    f"{'/'.join(path)} is {target.shape}")
            _set_leaf(params, path, np.ascontiguousarray(value).astype(target.dtype))

    skipped, unknown = [], []
    for key in keys:
        if key in used or not key.startswith(prefix):
            continue  # outside the tower (an LLM, a text tower): not ours to judge
        relative = key[len(prefix):]
        if relative.startswith(UNUSED_TOWER_KEYS):
            skipped.append(key)
        elif prefix or relative.startswith(TOWER_ROOTS):
            unknown.append(key)
    if unknown and strict:
        raise CheckpointError(
            f"{label}: unexpected tower tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
            f"(e.g. layer-scale or a deeper model than layers={encoder_config.layers}); "
            f"pass strict=False to skip them")
    skipped += unknown
    return ImportResult(params, sorted(skipped), prefix, projector_prefix)


def export_ecg_coca(params: Mapping[str, Any], encoder_config: ECGEncoderConfig,
                    projector_config: ProjectorConfig | None = None, *,
                    prefix: str = "module.ecg.", projector_prefix: str = "model.") -> dict:
    """`ECGTower` params -> {torch key: float32 np.ndarray} in the ECG-CoCa / GEM layout.

    Projector keys are written when `projector_config` is given and `params` has a "projector"."""
    params = nn.unbox(params)
    rules = _encoder_rules(encoder_config, prefix)
    if projector_config is not None and "projector" in params:
        rules += _projector_rules(projector_config, encoder_config.width, projector_prefix)
    out = {}
    for rule in rules:
        try:
            leaves = [np.asarray(jnp.asarray(_leaf(params, path), jnp.float32))
                      for path in rule.flax_paths]
        except KeyError:
            raise CheckpointError(f"params have no leaf {'/'.join(rule.flax_paths[0])} "
                                  f"(needed for {rule.torch_key!r})") from None
        tensor = rule.to_torch(leaves)
        if tuple(tensor.shape) != rule.torch_shape:
            raise CheckpointError(f"param for {rule.torch_key!r} exports as {tensor.shape}, "
                                  f"expected {rule.torch_shape} ({_describe(encoder_config)})")
        out[rule.torch_key] = np.array(tensor, dtype=np.float32, order="C")  # writable copy
    return out


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes an exported state dict: `.safetensors`, else a torch file `{"state_dict": ...}` that
    ECG-CoCa's / GEM's loaders read."""
    import torch
    tensors = {k: torch.tensor(np.asarray(v)) for k, v in state.items()}
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors}, path)
