"""ECG interpretation with a trained UniECG model: ECG signals and/or ECG images in, reports out.

    interpreter = Interpreter.load("/tmp/stage1")          # a train workdir or a model checkpoint
    reports = interpreter.interpret(ecgs)                  # ecgs [B, 12, 5000] mV at 500 Hz
    reports = interpreter.interpret([ecg, None], images=[None, "scan.png"])  # per-example inputs

A model with an image tower (`model.vision_tower`, GEM's CLIP ViT) reads, per example, a signal,
an image (a PNG/JPEG path, an RGB uint8 page `[H, W, 3]` or CLIP pixels `[S, S, 3]`) or both. The
batch is one fixed-size splice (`models.stage1.expand_multimodal_inputs`: E ECG slots then I image
slots at the placeholder, presence masks per example), so every mix of input kinds runs the same
compiled program. An example given only a signal gets its printed page rendered from it
(`data.multimodal.ecg_pixels`, the training renderer, without print distortions), as GEM's
pipeline expects, unless `render_missing_images=False` (the model then reads the signal alone: the
"signal" kind of `uniecg eval interpret`). A model without an image tower given an image raises
UniECGError.

ECGs arrive in the record layer's lead order (`data.record.LEADS`); the rows are put in the order
the model's encoder was trained on (`model.input.ecg_lead_order`, e.g. MIMIC-IV-ECG file order for
GEM / ECG-CoCa weights) here, once, as the stage-1 training examples do.

Prompts come from `data.chat_format.InputBuilder` (the builder the training examples use) and are
left-padded; the single `<ecg>` placeholder of each prompt expands into the E (+ I) slots by
`models.stage1.expand_multimodal_inputs` (the layout of the training forward pass), and the slot
embeddings are spliced in at prefill through the Decoder's `extra_embeddings`, so the on-device
decode loop is the same as for text-only decoding.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uniecg_jax.checkpoint import (MODEL_SUBDIR, load_checked_config, resolve_model_dir,
                                   restore_model, save_model)
from uniecg_jax.data.chat_format import INTERPRETATION_REQUEST, InputBuilder
from uniecg_jax.data.image_preprocess import clip_preprocess, load_image
from uniecg_jax.data.multimodal import ecg_pixels
from uniecg_jax.data.record import to_encoder_lead_order
from uniecg_jax.data.tokenizer import load_serving_tokenizer
from uniecg_jax.errors import UniECGError
from uniecg_jax.inference import decoding
from uniecg_jax.layers.params import abstract_module_params
from uniecg_jax.models.llm import Decoder
from uniecg_jax.models.stage1 import UniECG, build_unified, expand_multimodal_inputs
from uniecg_jax.sharding import HostDataParallel

DEFAULT_PROMPT = INTERPRETATION_REQUEST
# The input kinds of a model with an image tower (`uniecg eval interpret` reports each).
INPUT_KINDS = ("signal", "image", "both")


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """One batch of the placeholder's inputs, fixed shapes whatever each example carries.

    ecg [B, leads, samples] float32 mV in the encoder's lead order (zeros where absent);
    image [B, S, S, C] float32 CLIP pixels (zeros where absent; None without an image tower);
    ecg_present / image_present [B] int32 0/1.
    """
    ecg: np.ndarray
    image: np.ndarray | None
    ecg_present: np.ndarray
    image_present: np.ndarray

    def __len__(self) -> int:
        return self.ecg.shape[0]

    def padded(self, rows: int) -> "ModelInputs":
        """The batch with its last example repeated `rows` more times."""
        if not rows:
            return self
        return ModelInputs(*(None if a is None else np.concatenate([a, np.repeat(a[-1:], rows, 0)])
                             for a in (self.ecg, self.image, self.ecg_present,
                                       self.image_present)))

    @property
    def kinds(self) -> list[str]:
        """Each example's input kind: "signal", "image" or "both"."""
        return [INPUT_KINDS[int(e) + 2 * int(i) - 1]
                for e, i in zip(self.ecg_present, self.image_present)]


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
    _data_parallel: Any = dataclasses.field(default=None, repr=False)

    @classmethod
    def load(cls, path: str, command: str = "uniecg interpret") -> "Interpreter":
        """From a stage-1 train workdir or model dir; another kind of checkpoint raises
        CheckpointError naming its kind and the command that uses it (`command` is the caller's)."""
        directory, config = load_checked_config(path, "stage1", command)
        model, ucfg = build_unified(config.model)
        enc = ucfg.encoder
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = abstract_module_params(
            model, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, enc.num_leads, enc.num_samples)),
            jnp.zeros((1,), jnp.int32), sharding=device)
        params, _ = restore_model(directory, abstract)
        tokenizer_dir = os.path.join(directory, "tokenizer")
        tokenizer = load_serving_tokenizer(tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
                                           placeholder=ucfg.input.placeholder)
        return cls(model, params, tokenizer, config)

    @property
    def num_ecg_tokens(self) -> int:
        return self.model.config.num_ecg_tokens

    @property
    def inputs(self) -> InputBuilder:
        """The input builder of this model's training data (tokenizer, chat template, system)."""
        return input_builder(self.tokenizer, self.config)

    @property
    def has_image_tower(self) -> bool:
        return self.model.config.vision is not None

    def build_inputs(self, prompts: Sequence[str], ecg_present=None, image_present=None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expanded, left-padded prompts: (ids [B, T], mask [B, T], slot positions [B, S]).

        S = E (signal-only model) or E + I (image tower; ECG slots first). ecg_present /
        image_present [B]: which slot blocks each row attends to (default: the ECG, and the image
        when the model has a tower); an absent block's slots are masked out.
        """
        inputs, pad, cfg = self.inputs, self.model.config.llm.pad_token_id, self.model.config
        ids, mask = decoding.left_pad([inputs.prompt_ids(p, with_ecg=True) for p in prompts], pad)
        ecg_position = np.argmax(ids == inputs.placeholder_id, axis=1).astype(np.int32)
        count = len(prompts)
        ecg_present = np.ones(count, np.int32) if ecg_present is None else ecg_present
        if image_present is None:
            image_present = np.full(count, int(self.has_image_tower), np.int32)
        expanded = expand_multimodal_inputs(
            ids, mask, ecg_position, np.asarray(ecg_present), np.asarray(image_present),
            cfg.num_ecg_tokens, cfg.num_image_tokens, pad)
        return tuple(np.asarray(array, np.int32) for array in expanded)

    def image_pixels(self, image: Any) -> np.ndarray:
        """One image -> the tower's CLIP pixels float32 [S, S, C]: a file path (PNG, JPEG, ...;
        RecordError naming it if unreadable), an RGB uint8 page [H, W, 3] (preprocessed as the
        config says: `vision_tower.image_size` / `image_aspect_ratio`) or pixels already [S, S, C]
        float."""
        vision = self.model.config.vision
        if vision is None:
            raise UniECGError("this model has no image tower (model.vision_tower): it reads ECG "
                              "signals only; give it the ECG record instead of an image")
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        image = np.asarray(image)
        if image.dtype == np.uint8:
            return clip_preprocess(image, vision.image_size, vision.image_aspect_ratio)
        if image.shape != self.model.config.image_shape:
            raise UniECGError(f"image pixels must be {self.model.config.image_shape} float (or an "
                              f"RGB uint8 page / an image file), got {image.dtype} {image.shape}")
        return image.astype(np.float32)

    def rendered_pixels(self, ecg: np.ndarray) -> np.ndarray:
        """ECG [12, samples] mV (`LEADS` order, encoder rate) -> CLIP pixels [S, S, C] of its
        printed page (the training renderer, no print distortions)."""
        vision = self.model.config.vision
        return ecg_pixels(ecg, vision.image_size, vision.image_aspect_ratio, "canonical")

    def model_inputs(self, ecgs=None, images=None, render_missing_images: bool = True
                     ) -> ModelInputs:
        """Per-example signals and images -> one fixed-shape `ModelInputs`.

        ecgs: [B, 12, samples] mV (`LEADS` order, encoder rate), or B entries each [12, samples]
          or None; None = no signals. images: [B, S, S, C] pixels, or B entries each a path, an
          RGB uint8 page, pixels or None; None = no images. An example needs at least one input;
          with `render_missing_images`, one with a signal and no image gets its rendered page.
        """
        count = _count(ecgs, images)
        ecg_rows = _rows(ecgs, count, "ecgs", "[B, leads, samples]")
        image_rows = _rows(images, count, "images", "[B, S, S, C]")
        if any(image is not None for image in image_rows) and not self.has_image_tower:
            raise UniECGError("this model has no image tower (model.vision_tower): it reads ECG "
                              "signals only; give it the ECG record instead of an image")
        enc = self.model.config.encoder
        ecg = np.zeros((count, enc.num_leads, enc.num_samples), np.float32)
        ecg_present = np.zeros(count, np.int32)
        image = (np.zeros((count, *self.model.config.image_shape), np.float32)
                 if self.has_image_tower else None)
        image_present = np.zeros(count, np.int32)
        for row, (signal, picture) in enumerate(zip(ecg_rows, image_rows)):
            if signal is None and picture is None:
                raise UniECGError(f"example {row} has neither an ECG signal nor an image")
            if signal is not None:
                signal = np.asarray(signal, np.float32)
                if signal.shape != ecg.shape[1:]:
                    raise UniECGError(f"example {row}: ECG must be {ecg.shape[1:]} (leads, samples "
                                      f"at the encoder rate), got {signal.shape}")
                ecg[row], ecg_present[row] = signal, 1
                if picture is None and render_missing_images and self.has_image_tower:
                    picture = self.rendered_pixels(signal)
            if picture is not None:
                image[row], image_present[row] = self.image_pixels(picture), 1
        ecg = to_encoder_lead_order(ecg, self.model.config.input.ecg_lead_order)
        return ModelInputs(ecg, image, ecg_present, image_present)

    def interpret(self, ecgs=None, prompts: Sequence[str] | str | None = None, *,
                  images=None, render_missing_images: bool = True,
                  max_new_tokens: int | None = None, sampling: decoding.Sampling | None = None,
                  seed: int = 0, batch_multiple: int = 1,
                  stop_token_ids: Sequence[int] | None = None) -> list[str]:
        """Signals and/or images of B examples (see `model_inputs`) -> B reports.

        ecgs [B, 12, samples] (mV, encoder rate, `LEADS` order) or B entries (None = no signal);
        images: B entries (path, uint8 page, pixels or None) or [B, S, S, C] pixels; a
        `ModelInputs` may be passed as `ecgs`.
        batch_multiple: rows are padded to a multiple of this (the device count for a sharded batch).
        stop_token_ids: default the model's eos; () decodes exactly max_new_tokens (benchmarks).
        """
        if isinstance(ecgs, ModelInputs):
            if images is not None:
                raise ValueError("images are part of the ModelInputs given; pass one or the other")
            batch = ecgs
        else:
            batch = self.model_inputs(ecgs, images, render_missing_images)
        count = len(batch)
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or DEFAULT_PROMPT] * count
        if len(prompts) != count:
            raise ValueError(f"{len(prompts)} prompts for {count} examples")
        padded = -count % batch_multiple
        batch = batch.padded(padded)
        prompts = list(prompts) + [prompts[-1]] * padded
        ids, mask, slots = self.build_inputs(prompts, batch.ecg_present, batch.image_present)
        max_new = int(max_new_tokens or self.config.eval.max_new_tokens)
        llm_cfg = self.model.config.llm
        stops = (llm_cfg.eos_token_id,) if stop_token_ids is None else tuple(stop_token_ids)
        out = self._generate(batch, ids, mask, slots, max_new, sampling or decoding.Sampling(),
                             seed, stops)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        eos = self.model.config.llm.eos_token_id
        reports = []
        for row in range(count):
            out = [t for t in tokens[row, :lengths[row]].tolist() if t != eos]
            reports.append(self.tokenizer.decode(out, skip_special_tokens=True).strip())
        return reports

    def encode(self, batch: ModelInputs, params=None, place=np.asarray):
        """The placeholder's slot embeddings [B, S, D] of a batch (one compiled program for every
        mix of input kinds)."""
        params = self.params if params is None else params
        if not self.has_image_tower:
            return encode_ecg_fn(self.model)(params, place(batch.ecg))
        return encode_multimodal_fn(self.model)(
            params, place(batch.ecg), place(batch.image), place(batch.ecg_present),
            place(batch.image_present))

    def _generate(self, batch, ids, mask, slots, max_new, sampling, seed, stops):
        params, place = self._placement(len(batch))
        slot_embeddings = self.encode(batch, params, place)
        llm_cfg = self.model.config.llm
        decoder = Decoder(llm_cfg)
        # The CPU decode kernels where generate() would use them (one device, f32, measured faster).
        small_batch_kernel, attention_kernel = decoding.decode_kernels(decoder, params["llm"],
                                                                       np.asarray(ids))
        generate = decoding.generate_fn(decoder, max_new, sampling, stops, llm_cfg.pad_token_id,
                                        small_batch_kernel=small_batch_kernel,
                                        attention_kernel=attention_kernel)
        return generate(params["llm"], place(ids), place(mask), slot_embeddings, place(slots),
                        jax.random.PRNGKey(seed))

    def _placement(self, batch: int):
        """(params, put) where `put` shards a batch over this host's devices when it divides
        evenly (params then replicated once), else keeps everything on the default device."""
        if self._data_parallel is None:
            self._data_parallel = HostDataParallel()
        return self._data_parallel.place(self.params, batch)


_ENCODE: dict = {}


def encode_ecg_fn(model: UniECG):
    """Jitted `(params, ecg [B, leads, samples]) -> ECG tokens [B, E, D]` (cached per model)."""
    if model.config not in _ENCODE:
        _ENCODE[model.config] = jax.jit(
            lambda params, ecg: model.apply({"params": params}, ecg, method=UniECG.encode_ecg))
    return _ENCODE[model.config]


_ENCODE_MULTIMODAL: dict = {}


def encode_multimodal_fn(model: UniECG):
    """Jitted `(params, ecg [B, leads, samples], image [B, S, S, C], ecg_present [B],
    image_present [B]) -> slot embeddings [B, E + I, D]` (cached per model)."""
    if model.config not in _ENCODE_MULTIMODAL:
        _ENCODE_MULTIMODAL[model.config] = jax.jit(
            lambda params, ecg, image, ecg_present, image_present: model.apply(
                {"params": params}, ecg, image, ecg_present, image_present,
                method=UniECG.encode_multimodal))
    return _ENCODE_MULTIMODAL[model.config]


def _count(ecgs, images) -> int:
    counts = {len(x) for x in (ecgs, images) if x is not None}
    if not counts:
        raise UniECGError("nothing to interpret: give ECG signals, images or both")
    if len(counts) > 1:
        raise UniECGError(f"{len(ecgs)} ECGs and {len(images)} images: give one of each per "
                          "example (None where an example lacks one)")
    return counts.pop()


def _rows(values, count: int, name: str, shape: str) -> list:
    """`values` (a batch array or a sequence) as `count` per-example entries (None kept)."""
    if values is None:
        return [None] * count
    if isinstance(values, np.ndarray) and values.ndim != shape.count(",") + 1:
        raise UniECGError(f"{name} must be {shape}, got shape {values.shape}")
    return list(values)
