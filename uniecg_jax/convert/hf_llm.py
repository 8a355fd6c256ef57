"""Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` safetensors <-> our `Decoder` params.

The mapping is declarative: `TENSOR_RULES` lists (HF name template, our path, layout kind). A layout
kind names the per-tensor hook:

  "linear":   HF nn.Linear weight [out, in] <-> our kernel [*in_dims, *out_dims] (transpose, then
              split heads: q/k/v kernels [D, H, Dh], o kernel [H, Dh, D], mlp kernels [D, F]).
  "reshape":  same element order, head split only (q/k/v biases [H*Dh] <-> [H, Dh]; norms, embeddings).

RoPE needs no hook: our RoPE uses HF's rotate_half layout. With `scan_layers` a layer tensor is
stacked on a leading [L] axis. Every shape is checked against the abstract Flax tree before any data is
read; a mismatch raises `CheckpointError` naming the HF tensor, our parameter and both shapes.

Import reads each tensor lazily (`safetensors.safe_open`, one tensor on the host at a time) and
builds it straight onto its target `NamedSharding` with `jax.make_array_from_callback`, so a 7B model
never has to fit on one device. Export (`save_hf`) goes through `convert.sharded_writer`: every host
writes the blocks of each tensor it holds, the `ours_to_hf` hook applied per block, so no host
gathers the model (nor, on a pod, another host's slices).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open

from uniecg_jax import sharding
from uniecg_jax.convert import sharded_writer
from uniecg_jax.data.tokenizer import add_tokens as add_tokenizer_tokens, copy_tokenizer_files
from uniecg_jax.errors import CheckpointError
from uniecg_jax.models import presets
from uniecg_jax.models.llm import Decoder, LLMConfig
from uniecg_jax.models.vocabulary import grow_vocab_rows

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# LLaVA / GEM model types whose language model is a plain Llama / Qwen2 (llava/model/
# language_model/llava_llama.py: LlavaConfig(LlamaConfig), model_type "llava_llama").
LLAVA_FAMILIES = {"llava_llama": "llama", "llava_qwen": "qwen2"}
# HF tensors that carry no parameters (old checkpoints saved RoPE buffers).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one of our leaves. `{i}` in `hf` and `ours` is the layer index."""
    hf: str
    ours: tuple[str, ...]
    kind: str            # "linear" | "reshape"
    in_dims: int = 1     # "linear": how many leading dims of our kernel are HF's `in` dim


LAYER_RULES = (
    TensorRule("model.layers.{i}.input_layernorm.weight", ("input_norm", "scale"), "reshape"),
    TensorRule("model.layers.{i}.self_attn.q_proj.weight", ("attention", "query", "kernel"),
               "linear"),
    TensorRule("model.layers.{i}.self_attn.k_proj.weight", ("attention", "key", "kernel"), "linear"),
    TensorRule("model.layers.{i}.self_attn.v_proj.weight", ("attention", "value", "kernel"),
               "linear"),
    TensorRule("model.layers.{i}.self_attn.q_proj.bias", ("attention", "query", "bias"), "reshape"),
    TensorRule("model.layers.{i}.self_attn.k_proj.bias", ("attention", "key", "bias"), "reshape"),
    TensorRule("model.layers.{i}.self_attn.v_proj.bias", ("attention", "value", "bias"), "reshape"),
    TensorRule("model.layers.{i}.self_attn.o_proj.weight", ("attention", "out", "kernel"), "linear",
               in_dims=2),
    TensorRule("model.layers.{i}.self_attn.o_proj.bias", ("attention", "out", "bias"), "reshape"),
    TensorRule("model.layers.{i}.post_attention_layernorm.weight", ("post_attention_norm", "scale"),
               "reshape"),
    TensorRule("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "gate", "kernel"), "linear"),
    TensorRule("model.layers.{i}.mlp.up_proj.weight", ("mlp", "up", "kernel"), "linear"),
    TensorRule("model.layers.{i}.mlp.down_proj.weight", ("mlp", "down", "kernel"), "linear"),
)
GLOBAL_RULES = (
    TensorRule("model.embed_tokens.weight", ("embedding",), "reshape"),
    TensorRule("model.norm.weight", ("final_norm", "scale"), "reshape"),
    TensorRule("lm_head.weight", ("lm_head", "kernel"), "linear"),
)


# ----------------------------------------------------------------------------- per-tensor hooks
def hf_shape(rule: TensorRule, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape that corresponds to one (unstacked) leaf of ours."""
    if rule.kind == "linear":
        return (math.prod(ours_shape[rule.in_dims:]), math.prod(ours_shape[:rule.in_dims]))
    if len(ours_shape) > 1 and "bias" in rule.ours[-1]:
        return (math.prod(ours_shape),)
    return tuple(ours_shape)


def hf_to_ours(rule: TensorRule, tensor: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind == "linear":
        return np.ascontiguousarray(tensor.T).reshape(ours_shape)
    return tensor.reshape(ours_shape)


def ours_to_hf(rule: TensorRule, array: np.ndarray) -> np.ndarray:
    if rule.kind == "linear":
        return np.ascontiguousarray(array.reshape(math.prod(array.shape[:rule.in_dims]), -1).T)
    return array.reshape(hf_shape(rule, array.shape))


# ----------------------------------------------------------------------------- tree addressing
def leaf_rules(config: LLMConfig) -> list[tuple[tuple[str, ...], TensorRule, list[str]]]:
    """(our leaf path, rule, HF names feeding it — one per layer when stacked) for the config."""
    entries = []
    for rule in GLOBAL_RULES:
        if rule.hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        entries.append((rule.ours, rule, [rule.hf]))
    for rule in LAYER_RULES:
        if rule.hf.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and not config.has_qkv_bias:
            continue
        if rule.hf.endswith("o_proj.bias") and not (config.attention_bias and config.family == "llama"):
            continue
        if config.scan_layers:
            entries.append((("layers",) + rule.ours, rule,
                            [rule.hf.format(i=i) for i in range(config.num_layers)]))
        else:
            for i in range(config.num_layers):
                entries.append(((f"layers_{i}",) + rule.ours, rule, [rule.hf.format(i=i)]))
    return entries


def _get_path(tree: Any, path: tuple[str, ...]) -> Any:
    node = tree
    for key in path:
        node = node[key]
    return node


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _flat_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        paths = []
        for key, value in tree.items():
            paths += _flat_paths(value, prefix + (key,))
        return paths
    return [prefix]


# ----------------------------------------------------------------------------- safetensors reading
class SafetensorsDir:
    """Lazy reader over `model.safetensors` or a sharded `model.safetensors.index.json` directory."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            self.weight_map = {name: os.path.join(directory, file)
                               for name, file in weight_map.items()}
        elif os.path.isfile(single_path):
            with safe_open(single_path, framework="numpy") as f:
                self.weight_map = {name: single_path for name in f.keys()}
        else:
            raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self._safe_open = safe_open
        self._handles: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str):
        path = self.weight_map[name]
        if path not in self._handles:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} for {name} but missing")
            self._handles[path] = self._safe_open(path, framework="numpy")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)


# ----------------------------------------------------------------------------- configs
def _rope_fields(hf: dict) -> tuple[float, dict]:
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default"))
    kind = "none" if kind in (None, "default") else kind
    if kind not in ("none", "linear", "dynamic", "llama3"):
        raise CheckpointError(f"config.json: rope type {kind!r} is not supported "
                              "(default, linear, dynamic, llama3)")
    rope = dict(kind=kind, factor=float(merged.get("factor", 1.0)),
                low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
                high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    merged.get("original_max_position_embeddings",
                               hf.get("max_position_embeddings", 8192))))
    return theta, rope


def _first_id(value, default: int) -> int:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return default if value is None else int(value)


def model_config_from_hf(hf_dir: str) -> ml_collections.ConfigDict:
    """Our `model` ConfigDict (presets.llm fields) from an HF `config.json`."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (needed to infer the model config)")
    with open(path) as f:
        hf = json.load(f)
    family = LLAVA_FAMILIES.get(hf.get("model_type"), hf.get("model_type"))
    if family not in ("llama", "qwen2"):
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not supported "
                              f"(llama, qwen2, {', '.join(LLAVA_FAMILIES)})")
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or 0)
    if head_dim == hf["hidden_size"] // heads:
        head_dim = 0
    theta, rope = _rope_fields(hf)
    eos = _first_id(hf.get("eos_token_id"), 2)
    model = presets.llm("tiny")
    model.update(dict(
        family=family, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim, rope_theta=theta, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
        bos_token_id=_first_id(hf.get("bos_token_id"), 1), eos_token_id=eos,
        pad_token_id=_first_id(hf.get("pad_token_id"), eos)))
    model.rope_scaling.update(rope)
    return model


def hf_config_from_model(config: LLMConfig, torch_dtype: str = "float32"):
    """A `transformers` LlamaConfig / Qwen2Config for our config (rope scaling, tying, ids)."""
    import transformers  # heavy (several s); only HF export / config building needs it
    rope = dict(config.rope_scaling)
    rope_parameters = {"rope_type": "default" if rope.get("kind", "none") == "none"
                       else rope["kind"], "rope_theta": config.rope_theta}
    if rope_parameters["rope_type"] in ("linear", "dynamic", "llama3"):
        rope_parameters["factor"] = rope.get("factor", 1.0)
    if rope_parameters["rope_type"] == "llama3":
        rope_parameters.update(
            low_freq_factor=rope.get("low_freq_factor", 1.0),
            high_freq_factor=rope.get("high_freq_factor", 4.0),
            original_max_position_embeddings=rope.get("original_max_position_embeddings", 8192))
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.resolved_head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope_parameters,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, dtype=torch_dtype,
        architectures=["LlamaForCausalLM" if config.family == "llama" else "Qwen2ForCausalLM"])
    if config.family == "llama":
        return transformers.LlamaConfig(attention_bias=config.attention_bias, **common)
    return transformers.Qwen2Config(**common)


# ----------------------------------------------------------------------------- import
def abstract_params_for(config: LLMConfig, mesh=None) -> Any:
    """Abstract params (ShapeDtypeStructs with NamedShardings) of a Decoder on `mesh`
    (default: all devices on the fsdp axis)."""
    mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    dummy = jnp.zeros((1, 1), jnp.int32)
    return sharding.abstract_sharded_params(Decoder(config), mesh, dummy)


def load_hf_params(hf_dir: str, config: LLMConfig, abstract_params: Any = None, mesh=None, *,
                   reader: SafetensorsDir | None = None,
                   tensor_names: Iterable[str] | None = None) -> dict:
    """Reads an HF safetensors dir into our param tree, each leaf placed on its sharding.

    Args:
      hf_dir: directory with model.safetensors or model.safetensors.index.json.
      config: our LLMConfig (param dtype = dtype of the returned leaves).
      abstract_params: target tree of ShapeDtypeStructs with `.sharding` (default from `mesh`).
      reader: an already open `SafetensorsDir` of `hf_dir` (default: opened here).
      tensor_names: the tensors of the directory that are the LLM's (default: all of them); a
        multimodal checkpoint (`convert.gem`) routes its other tensors elsewhere.
    Raises:
      CheckpointError naming the tensor on a missing / unexpected / wrong-shaped tensor.
    """
    reader = reader or SafetensorsDir(hf_dir)
    abstract = abstract_params if abstract_params is not None else abstract_params_for(config, mesh)
    entries = leaf_rules(config)
    expected_paths = {path for path, _, _ in entries}
    abstract_paths = set(_flat_paths(abstract))
    if expected_paths != abstract_paths:
        raise CheckpointError(f"internal name map does not cover the model: missing "
                              f"{sorted(abstract_paths - expected_paths)}, extra "
                              f"{sorted(expected_paths - abstract_paths)}")
    available = set(reader.keys() if tensor_names is None else tensor_names)
    needed = {name for _, _, names in entries for name in names}
    missing = sorted(needed - available)
    if missing:
        raise CheckpointError(f"{hf_dir}: missing tensors {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(name for name in available - needed
                        if not name.endswith(IGNORED_HF_SUFFIXES)
                        and not (name == "lm_head.weight" and config.tie_word_embeddings))
    if unexpected:
        raise CheckpointError(f"{hf_dir}: tensors the model has no place for: {unexpected[:8]} "
                              "(wrong config? e.g. tie_word_embeddings or attention_bias)")
    # Check every shape before reading any data.
    for path, rule, names in entries:
        target = _get_path(abstract, path)
        leaf_shape = tuple(target.shape[1:] if config.scan_layers and path[0] == "layers"
                           else target.shape)
        want = hf_shape(rule, leaf_shape)
        for name in names:
            got = reader.shape(name)
            if got != want:
                raise CheckpointError(
                    f"{hf_dir}: tensor {name} has shape {got}, but {'/'.join(path)} "
                    f"{tuple(target.shape)} needs {want} (check the config: vocab_size, "
                    "hidden_size, heads, head_dim)")

    params: dict = {}
    for path, rule, names in entries:
        target = _get_path(abstract, path)
        stacked = config.scan_layers and path[0] == "layers"
        leaf_shape = tuple(target.shape[1:] if stacked else target.shape)
        parts = [hf_to_ours(rule, reader.get(name), leaf_shape).astype(target.dtype)
                 for name in names]
        host = np.stack(parts) if stacked else parts[0]
        del parts
        array = jax.make_array_from_callback(target.shape, target.sharding,
                                             lambda index, host=host: host[index])
        _set_path(params, path, array)
        del host
    return params


# ----------------------------------------------------------------------------- export
def hf_state_dict(params: Any, config: LLMConfig, dtype: Any = None) -> Iterable[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy tensor) one at a time (gathered to this host)."""
    for path, rule, names in leaf_rules(config):
        array = np.asarray(jax.device_get(_get_path(params, path)))
        if dtype is not None:
            array = array.astype(dtype)
        stacked = config.scan_layers and path[0] == "layers"
        for layer, name in enumerate(names):
            yield name, ours_to_hf(rule, array[layer] if stacked else array)


def _torch_dtype_name(dtype: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dtype).name]


def hf_layout(rule: TensorRule, leaf_ndim: int, layer: int | None = None
              ) -> sharded_writer.TensorLayout:
    """The `ours_to_hf` hook of `rule` as a block layout for the sharded writer, for one (unstacked)
    leaf of `leaf_ndim` axes, `layer` picked from a scanned stack."""
    if rule.kind == "linear":
        return sharded_writer.TensorLayout(
            layer, (tuple(range(rule.in_dims)), tuple(range(rule.in_dims, leaf_ndim))), True)
    if leaf_ndim > 1 and "bias" in rule.ours[-1]:
        return sharded_writer.TensorLayout(layer, (tuple(range(leaf_ndim)),))
    return sharded_writer.TensorLayout(layer)


def export_tensors(params: Any, config: LLMConfig, dtype: Any = None
                   ) -> list[sharded_writer.ExportTensor]:
    """Every HF tensor of `params` (leaves may be sharded over many hosts) as a lazy
    `ExportTensor`: nothing is gathered until the writer asks for a host's blocks."""
    tensors = []
    for path, rule, names in leaf_rules(config):
        array = _get_path(params, path)
        stacked = config.scan_layers and path[0] == "layers"
        leaf_ndim = len(array.shape) - (1 if stacked else 0)
        for layer, name in enumerate(names):
            tensors.append(sharded_writer.ExportTensor(
                name, array, hf_layout(rule, leaf_ndim, layer if stacked else None), dtype))
    return tensors


def save_hf(params: Any, config: LLMConfig, out_dir: str, tokenizer_dir: str | None = None,
            dtype: Any = None, max_shard_bytes: int | None = None,
            max_shard_size: int | str = "5GB", progress: bool = False,
            extra_tensors: Iterable[sharded_writer.ExportTensor] = ()) -> str:
    """Writes an HF directory `from_pretrained` loads: config.json, generation_config.json,
    tokenizer files (copied from `tokenizer_dir`), model.safetensors (or shards + index when
    larger than `max_shard_size`, HF semantics: "5GB" = 5e9 bytes; `max_shard_bytes` overrides).
    `extra_tensors` (a multimodal model's towers, `convert.gem`) go into the same files and index.

    Call it on every host of a multi-host job: each host writes the tensor slices it holds
    (`convert.sharded_writer`), host 0 the config, tokenizer and index."""
    import transformers
    np_dtype = np.dtype(dtype) if dtype is not None else np.dtype(config.params_dtype)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        hf_config = hf_config_from_model(config, _torch_dtype_name(np_dtype))
        hf_config.save_pretrained(out_dir)
        transformers.GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id).save_pretrained(out_dir)
        copy_tokenizer_files(tokenizer_dir, out_dir)
    sharded_writer.write_safetensors(
        export_tensors(params, config, np_dtype) + list(extra_tensors), out_dir, prefix="model",
        max_shard_size=max_shard_bytes if max_shard_bytes is not None else max_shard_size,
        metadata={"format": "pt"}, progress=progress)
    return out_dir


# ----------------------------------------------------------------------------- added tokens
def add_tokens(params: dict, model_config: ml_collections.ConfigDict, tokenizer, tokens: list[str]
               ) -> tuple[dict, ml_collections.ConfigDict, list[int]]:
    """Adds `tokens` (e.g. the stage-2 `[ECG]` tokens) to `tokenizer` (in place, as special tokens:
    `data.tokenizer.add_tokens`) and grows the embedding (and untied lm_head) to cover them; the
    rows of newly added tokens = mean of the other rows (`models.vocabulary.grow_vocab_rows`).
    Tokens the tokenizer already has keep their ids and rows, so a second call changes nothing.

    Returns (params, model_config with the new vocab_size, ids of the tokens). Save the tokenizer
    with `tokenizer.save_pretrained`.
    """
    token_ids, new_ids = add_tokenizer_tokens(tokenizer, tokens)
    new_vocab = max(int(model_config.vocab_size), int(params["embedding"].shape[0]),
                    len(tokenizer), max(token_ids) + 1)
    params = grow_vocab_rows(params, new_vocab, new_ids)
    params["embedding"] = jnp.asarray(params["embedding"])
    if "lm_head" in params:
        params["lm_head"] = {"kernel": jnp.asarray(params["lm_head"]["kernel"])}
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    model_config.vocab_size = new_vocab
    return params, model_config, token_ids
