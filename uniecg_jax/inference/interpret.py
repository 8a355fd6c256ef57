"""ECG interpretation with a trained UniECG model: ECG records in, evidence-based reports out.

    interpreter = Interpreter.load("/tmp/stage1")          # a train workdir or a model checkpoint
    reports = interpreter.interpret(ecgs)                  # ecgs [B, 12, 5000] mV at 500 Hz

ECGs arrive in the record layer's lead order (`data.record.LEADS`); the rows are put in the order
the model's encoder was trained on (`model.input.ecg_lead_order`, e.g. MIMIC-IV-ECG file order for
GEM / ECG-CoCa weights) here, once, as the stage-1 training examples do.

Prompts come from `data.chat_format.InputBuilder` (the builder the training examples use) and are
left-padded; the single `<ecg>` placeholder of each prompt expands into the E ECG tokens by
`models.stage1.expand_inputs` (the layout of the training forward pass), and the ECG embeddings are
spliced in at prefill through the Decoder's `extra_embeddings`, so the on-device decode loop is the
same as for text-only decoding.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uniecg_jax.checkpoint import load_model_config, restore_model, save_model
from uniecg_jax.data.chat_format import INTERPRETATION_REQUEST, InputBuilder
from uniecg_jax.data.record import to_encoder_lead_order
from uniecg_jax.data.tokenizer import load_tokenizer
from uniecg_jax.inference import decoding
from uniecg_jax.errors import CheckpointError
from uniecg_jax.layers.params import abstract_module_params
from uniecg_jax.models.llm import Decoder
from uniecg_jax.models.stage1 import UniECG, build_unified, expand_inputs

DEFAULT_PROMPT = INTERPRETATION_REQUEST
MODEL_SUBDIR = "model"  # where `uniecg train` exports the final model inside a workdir


def resolve_model_dir(path: str) -> str:
    """A model checkpoint dir (has config.json), or a train workdir holding one in `model/`."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    nested = os.path.join(path, MODEL_SUBDIR)
    if os.path.isfile(os.path.join(nested, "config.json")):
        return nested
    raise CheckpointError(f"{path}: not a model checkpoint (no config.json) and not a train workdir "
                          f"with an exported {MODEL_SUBDIR}/ (train to completion first)")


def export_model(workdir: str, params: Any, config: ml_collections.ConfigDict, tokenizer) -> str:
    """Writes `workdir/model/`: params, config.json and the tokenizer (loadable by `Interpreter`)."""
    directory = save_model(os.path.join(workdir, MODEL_SUBDIR), params, config)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    return directory


def model_exporter(config: ml_collections.ConfigDict, tokenizer):
    """The `task.export(workdir, params)` hook of objectives that serve a model (stage 1, 2)."""
    def export(workdir: str, params: Any) -> str:
        return export_model(workdir, params, config, tokenizer)
    return export


def input_builder(tokenizer, config: ml_collections.ConfigDict) -> InputBuilder:
    """The `InputBuilder` a model trained with `config` was trained on (`model.input`,
    `data.system`)."""
    return InputBuilder.for_model(tokenizer, config.model.get("input", {}),
                                  config.data.get("system", "") or None)


@dataclasses.dataclass
class Interpreter:
    """A UniECG model with its params and tokenizer, ready to interpret batches of ECGs."""
    model: UniECG
    params: Any
    tokenizer: Any
    config: ml_collections.ConfigDict
    _replicated: Any = dataclasses.field(default=None, repr=False)
    _batch_sharding: Any = dataclasses.field(default=None, repr=False)

    @classmethod
    def load(cls, path: str) -> "Interpreter":
        directory = resolve_model_dir(path)
        config = load_model_config(directory)
        model, ucfg = build_unified(config.model)
        enc = ucfg.encoder
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = abstract_module_params(
            model, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, enc.num_leads, enc.num_samples)),
            jnp.zeros((1,), jnp.int32), sharding=device)
        params, _ = restore_model(directory, abstract)
        tokenizer_dir = os.path.join(directory, "tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
                                   placeholder=ucfg.input.placeholder)
        return cls(model, params, tokenizer, config)

    @property
    def num_ecg_tokens(self) -> int:
        return self.model.config.num_ecg_tokens

    @property
    def inputs(self) -> InputBuilder:
        """The input builder of this model's training data (tokenizer, chat template, system)."""
        return input_builder(self.tokenizer, self.config)

    def build_inputs(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expanded, left-padded prompts: (ids [B, T], mask [B, T], ecg slot positions [B, E])."""
        inputs, pad = self.inputs, self.model.config.llm.pad_token_id
        ids, mask = decoding.left_pad([inputs.prompt_ids(p, with_ecg=True) for p in prompts], pad)
        ecg_position = np.argmax(ids == inputs.placeholder_id, axis=1).astype(np.int32)
        expanded = expand_inputs(ids, mask, ecg_position, self.num_ecg_tokens, pad)
        return tuple(np.asarray(array, np.int32) for array in expanded)

    def interpret(self, ecgs: np.ndarray, prompts: Sequence[str] | str | None = None, *,
                  max_new_tokens: int | None = None, sampling: decoding.Sampling | None = None,
                  seed: int = 0, batch_multiple: int = 1,
                  stop_token_ids: Sequence[int] | None = None) -> list[str]:
        """ecgs [B, 12, samples] (mV, encoder rate, `LEADS` order) -> B reports.

        batch_multiple: rows are padded to a multiple of this (the device count for a sharded batch).
        stop_token_ids: default the model's eos; () decodes exactly max_new_tokens (benchmarks).
        """
        ecgs = np.asarray(ecgs, np.float32)
        if ecgs.ndim != 3:
            raise ValueError(f"ecgs must be [B, leads, samples], got shape {ecgs.shape}")
        ecgs = to_encoder_lead_order(ecgs, self.model.config.input.ecg_lead_order)
        count = ecgs.shape[0]
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or DEFAULT_PROMPT] * count
        if len(prompts) != count:
            raise ValueError(f"{len(prompts)} prompts for {count} ECGs")
        padded = -count % batch_multiple
        if padded:
            ecgs = np.concatenate([ecgs, np.repeat(ecgs[-1:], padded, axis=0)])
            prompts = list(prompts) + [prompts[-1]] * padded
        ids, mask, slots = self.build_inputs(prompts)
        max_new = int(max_new_tokens or self.config.eval.max_new_tokens)
        llm_cfg = self.model.config.llm
        stops = (llm_cfg.eos_token_id,) if stop_token_ids is None else tuple(stop_token_ids)
        out = self._generate(ecgs, ids, mask, slots, max_new, sampling or decoding.Sampling(), seed,
                             stops)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        eos = self.model.config.llm.eos_token_id
        reports = []
        for row in range(count):
            out = [t for t in tokens[row, :lengths[row]].tolist() if t != eos]
            reports.append(self.tokenizer.decode(out, skip_special_tokens=True).strip())
        return reports

    def _generate(self, ecgs, ids, mask, slots, max_new, sampling, seed, stops):
        params, place = self._placement(ecgs.shape[0])
        ecg_tokens = encode_ecg_fn(self.model)(params, place(ecgs))
        llm_cfg = self.model.config.llm
        generate = decoding.generate_fn(Decoder(llm_cfg), max_new, sampling, stops,
                                        llm_cfg.pad_token_id)
        return generate(params["llm"], place(ids), place(mask), ecg_tokens, place(slots),
                        jax.random.PRNGKey(seed))

    def _placement(self, batch: int):
        """(params, put) where `put` shards a batch over this host's devices when it divides
        evenly (params then replicated once), else keeps everything on the default device."""
        devices = jax.local_devices()
        if len(devices) == 1 or batch % len(devices):
            return self.params, jnp.asarray
        if self._replicated is None:
            mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
            self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                "batch"))
            self._replicated = jax.device_put(
                self.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        return self._replicated, lambda x: jax.device_put(np.asarray(x), self._batch_sharding)


_ENCODE: dict = {}


def encode_ecg_fn(model: UniECG):
    """Jitted `(params, ecg [B, leads, samples]) -> ECG tokens [B, E, D]` (cached per model)."""
    if model.config not in _ENCODE:
        _ENCODE[model.config] = jax.jit(
            lambda params, ecg: model.apply({"params": params}, ecg, method=UniECG.encode_ecg))
    return _ENCODE[model.config]
