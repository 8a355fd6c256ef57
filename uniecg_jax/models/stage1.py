"""The UniECG multimodal model: ECG tower (patch encoder + GEM projectors) feeding the decoder LLM.

A conversation arrives as token ids with ONE `<ecg>` placeholder (`data.chat_format.InputBuilder`
builds them for training and serving). The placeholder expands into the ECG tower's
`E = 1 + samples / patch` tokens: every per-token array ([B, T] ids, masks, targets) is re-indexed
to [B, T + E - 1] by one fixed-size gather, and the ECG embeddings are scattered into the LLM
embeddings at positions `ecg_position + arange(E)` (the Decoder's `extra_embeddings`). No
data-dependent shapes, so training and decoding jit. `expand_inputs` is that layout, the one
implementation the forward pass, the loss and the serving prompts (`inference.interpret`) use.

The placeholder itself is never embedded (its slot becomes the first ECG slot), so it may be an added
`<ecg>` token or, as in LLaVA / GEM, a sentinel id outside the vocabulary (-200,
`model.input.placeholder = "sentinel"`): a GEM model keeps its 32000 embedding rows.

With an image tower (`model.vision_tower`, GEM's CLIP ViT) the placeholder expands into a fixed
`E + I` slots, GEM's order (`llava_arch.prepare_inputs_labels_for_multimodal`: ECG features, then
image features, concatenated on the token axis): ECG tokens through `ecg_projector` + the shared
`mm_projector`, image tokens through `mm_projector` alone. Which modalities an example carries is
data, not shape: `ecg_present` / `image_present` [B] set the attention mask of each block of slots,
and the Decoder counts positions over real tokens only, so an absent block neither is attended to
nor shifts a position: every real token sees exactly the manual concatenation of the present tokens
(signal only, image only or both in one compiled program). `next_real_targets` is the matching loss
layout. Without `model.vision_tower` the model, its params and its layout are as before.

Params: {"ecg_tower": {"encoder", "projector"}, "llm": <Decoder params>} plus "vision_tower"
(`models.clip_vision`) when configured; the LLM subtree is exactly the Decoder's, so HF conversion
applies to `params["llm"]` unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.models.clip_vision import ClipVisionConfig, ClipVisionTower
from uniecg_jax.models.ecg_encoder import ECGEncoderConfig, ECGTower, ProjectorConfig
from uniecg_jax.models.llm import Decoder, LLMConfig
from uniecg_jax.models.schema import InputFormatConfig, check_group_keys

UNIECG_GROUPS = ("llm", "ecg_encoder", "projector", "input", "vision_tower")


@dataclasses.dataclass(frozen=True)
class UniECGConfig:
    llm: LLMConfig
    encoder: ECGEncoderConfig
    projector: ProjectorConfig
    input: InputFormatConfig = InputFormatConfig()
    vision: ClipVisionConfig | None = None   # GEM's image tower; None = signal only

    @classmethod
    def from_config(cls, model_config: Any, group: str = "model") -> "UniECGConfig":
        """From `config.model` with sub-groups `llm`, `ecg_encoder`, `projector` and the optional
        `input` (each loaded by its dataclass's strict `from_config`; any other key is an error;
        checkpoints without `input` get its defaults, the project's own format)."""
        values = check_group_keys(model_config, UNIECG_GROUPS, group)
        llm = LLMConfig.from_config(values.get("llm"), f"{group}.llm")
        encoder = ECGEncoderConfig.from_config(values.get("ecg_encoder"), f"{group}.ecg_encoder")
        projector = ProjectorConfig.from_config(values.get("projector"), f"{group}.projector",
                                                ecg_width=encoder.width)
        if projector.llm_hidden_size != llm.hidden_size:
            raise ValueError(f"model.projector.llm_hidden_size={projector.llm_hidden_size} must equal "
                             f"model.llm.hidden_size={llm.hidden_size}")
        vision = None
        if values.get("vision_tower") is not None:
            vision = ClipVisionConfig.from_config(values["vision_tower"], f"{group}.vision_tower")
            if vision.hidden_size != projector.ecg_proj_dim:
                raise ValueError(f"{group}.vision_tower.hidden_size={vision.hidden_size} must equal "
                                 f"{group}.projector.ecg_proj_dim={projector.ecg_proj_dim}: image "
                                 "features enter the shared mm_projector (GEM's mm_hidden_size)")
        return cls(llm, encoder, projector,
                   InputFormatConfig.from_config(values.get("input"), f"{group}.input"), vision)

    @property
    def num_ecg_tokens(self) -> int:
        """E: LLM positions one ECG occupies (CLS + patches)."""
        return self.encoder.num_tokens

    @property
    def num_image_tokens(self) -> int:
        """I: LLM positions one image occupies (576 for ViT-L/14-336 patches), 0 without a tower."""
        return self.vision.num_tokens if self.vision is not None else 0

    @property
    def num_slots(self) -> int:
        """E + I: positions the placeholder expands into, whatever an example carries."""
        return self.num_ecg_tokens + self.num_image_tokens

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[H, W, C] of the tower's (preprocessed, channels-last) input."""
        if self.vision is None:
            raise ValueError("this model has no image tower (model.vision_tower)")
        return (self.vision.image_size, self.vision.image_size, self.vision.num_channels)


def expanded_indices(ecg_position: jax.Array, length: int, num_ecg_tokens: int) -> jax.Array:
    """Source index in the placeholder sequence for every slot of the expanded sequence.

    Args:
      ecg_position: [B] index of the `<ecg>` placeholder in each row.
      length: T, the placeholder sequence length.
      num_ecg_tokens: E.
    Returns:
      [B, T + E - 1] int32: the source index, or -1 for the E slots the ECG tokens fill.
    """
    slots = jnp.arange(length + num_ecg_tokens - 1)[None, :]
    position = ecg_position[:, None]
    return jnp.where(slots < position, slots,
                     jnp.where(slots < position + num_ecg_tokens, -1, slots - num_ecg_tokens + 1)
                     ).astype(jnp.int32)


def expand_at_placeholder(values: jax.Array, ecg_position: jax.Array, num_ecg_tokens: int,
                          fill: Any) -> jax.Array:
    """[B, T] per-token values -> [B, T + E - 1] with `fill` in the E ECG slots."""
    index = expanded_indices(ecg_position, values.shape[1], num_ecg_tokens)
    gathered = jnp.take_along_axis(values, jnp.maximum(index, 0), axis=1)
    return jnp.where(index < 0, jnp.asarray(fill, values.dtype), gathered)


def ecg_slot_positions(ecg_position: jax.Array, num_ecg_tokens: int) -> jax.Array:
    """[B] placeholder positions -> [B, E] positions of the ECG tokens in the expanded sequence."""
    return (ecg_position[:, None] + jnp.arange(num_ecg_tokens)[None, :]).astype(jnp.int32)


def expand_inputs(input_ids: jax.Array, attention_mask: jax.Array, ecg_position: jax.Array,
                  num_ecg_tokens: int, pad_token_id: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The expanded layout of placeholder sequences (right- or left-padded alike).

    Args:
      input_ids / attention_mask: [B, T] with one `<ecg>` placeholder per row at `ecg_position` [B].
    Returns:
      ids [B, T + E - 1] (`pad_token_id` in the ECG slots, whose embeddings are overwritten),
      attention mask [B, T + E - 1] (1 in the ECG slots), ECG slot positions [B, E] int32.
    """
    ids = expand_at_placeholder(input_ids, ecg_position, num_ecg_tokens, pad_token_id)
    mask = expand_at_placeholder(attention_mask, ecg_position, num_ecg_tokens, 1)
    return ids, mask, ecg_slot_positions(ecg_position, num_ecg_tokens)


def slot_presence(ecg_present: jax.Array, image_present: jax.Array, num_ecg_tokens: int,
                  num_image_tokens: int) -> jax.Array:
    """[B] ECG / image flags -> [B, E + I] int32 attention mask of the placeholder's slots
    (ECG block first, GEM's order)."""
    ecg = jnp.broadcast_to(ecg_present.astype(jnp.int32)[:, None],
                           (ecg_present.shape[0], num_ecg_tokens))
    image = jnp.broadcast_to(image_present.astype(jnp.int32)[:, None],
                             (image_present.shape[0], num_image_tokens))
    return jnp.concatenate([ecg, image], axis=1)


def expand_multimodal_inputs(input_ids: jax.Array, attention_mask: jax.Array,
                             ecg_position: jax.Array, ecg_present: jax.Array,
                             image_present: jax.Array, num_ecg_tokens: int, num_image_tokens: int,
                             pad_token_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`expand_inputs` with E + I slots whose mask says which modalities each row carries.

    Args:
      input_ids / attention_mask: [B, T] with one placeholder per row at `ecg_position` [B].
      ecg_present / image_present: [B] bool or 0/1.
    Returns:
      ids [B, T + E + I - 1], attention mask [B, T + E + I - 1] (0 in an absent block's slots),
      slot positions [B, E + I] int32 (ECG slots first).
    """
    ids, mask, slots = expand_inputs(input_ids, attention_mask, ecg_position,
                                     num_ecg_tokens + num_image_tokens, pad_token_id)
    rows = jnp.arange(ids.shape[0])[:, None]
    presence = slot_presence(ecg_present, image_present, num_ecg_tokens, num_image_tokens)
    return ids, mask.at[rows, slots].set(presence.astype(mask.dtype)), slots


def next_real_targets(ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Next-token targets over a sequence with masked-out slots inside it.

    Each real position predicts the next REAL token (an absent modality's slots are skipped, as
    if they were never there); masked positions and the last real one predict nothing.

    Args:
      ids / attention_mask / loss_mask: [B, S] (loss_mask: 1 = the token is a target).
    Returns:
      targets [B, S] int32 and target mask [B, S] (loss_mask of the next real token, 0 for
      masked positions and positions with no next real token).
    """
    length = ids.shape[1]
    index = jnp.where(attention_mask > 0, jnp.arange(length)[None, :], length)
    # The first real index at or after each slot, then moved one slot on: the next real index.
    first_at_or_after = jax.lax.cummin(index, axis=1, reverse=True)
    following = jnp.concatenate([first_at_or_after[:, 1:],
                                 jnp.full_like(index[:, :1], length)], axis=1)
    valid = (following < length) & (attention_mask > 0)
    safe = jnp.minimum(following, length - 1)
    targets = jnp.take_along_axis(ids, safe, axis=1)
    target_mask = jnp.where(valid, jnp.take_along_axis(loss_mask, safe, axis=1), 0)
    return targets.astype(jnp.int32), target_mask.astype(loss_mask.dtype)


class UniECG(nn.Module):
    """ECG tower + decoder LLM."""
    config: UniECGConfig

    def setup(self):
        self.ecg_tower = ECGTower(self.config.encoder, self.config.projector)
        self.llm = Decoder(self.config.llm)
        if self.config.vision is not None:
            self.vision_tower = ClipVisionTower(self.config.vision)

    def encode_ecg(self, ecg: jax.Array) -> jax.Array:
        """ecg [B, leads, samples] float32 mV -> LLM-width ECG tokens [B, E, D]."""
        return self.ecg_tower(ecg)

    def encode_multimodal(self, ecg: jax.Array, image: jax.Array, ecg_present: jax.Array,
                          image_present: jax.Array) -> jax.Array:
        """The placeholder's E + I slot embeddings [B, E + I, D]: ECG tokens, then image tokens
        (GEM's order; image [B, H, W, C] CLIP-normalised, features of the selected layer through
        the shared mm_projector). An absent block is zeroed: its slots are attention-masked
        anyway, and the zero keeps its tower out of the gradient."""
        if self.config.vision is None:
            raise ValueError("this model has no image tower (model.vision_tower)")
        tokens = self.ecg_tower.with_image(ecg, self.vision_tower(image))
        present = slot_presence(ecg_present, image_present, self.config.num_ecg_tokens,
                                self.config.num_image_tokens)
        return jnp.where(present[:, :, None] > 0, tokens, 0)

    def multimodal_inputs(self, batch: int, ecg: jax.Array | None, image: jax.Array | None,
                          ecg_present: jax.Array | None, image_present: jax.Array | None):
        """Fills what a call leaves out: a missing ECG / image becomes zeros marked absent, a
        missing flag means present. Returns (ecg, image, ecg_present, image_present)."""
        cfg = self.config
        if ecg_present is None:
            ecg_present = jnp.full((batch,), ecg is not None, jnp.int32)
        if ecg is None:
            ecg = jnp.zeros((batch, cfg.encoder.num_leads, cfg.encoder.num_samples), jnp.float32)
        if image_present is None:
            image_present = jnp.full((batch,), image is not None, jnp.int32)
        if image is None:
            image = jnp.zeros((batch, *cfg.image_shape), jnp.float32)
        return ecg, image, ecg_present, image_present

    def __call__(self, input_ids: jax.Array, ecg: jax.Array | None, ecg_position: jax.Array,
                 attention_mask: jax.Array | None = None, return_hidden: bool = False,
                 image: jax.Array | None = None, ecg_present: jax.Array | None = None,
                 image_present: jax.Array | None = None):
        """Teacher-forced forward pass.

        Args:
          input_ids: [B, T] with one `<ecg>` placeholder per row at `ecg_position` [B].
          ecg: [B, leads, samples] (None: image only; needs an image tower).
          attention_mask: [B, T] 1 = real token.
          image: [B, H, W, C] CLIP-normalised (models with `vision_tower` only).
          ecg_present / image_present: [B] 0/1, which inputs each row carries (default: those
            given).
        Returns:
          logits [B, T + S - 1, V] float32 over the expanded sequence (S = E, or E + I with an
          image tower; expand targets and loss masks with `expand_at_placeholder` and
          `next_real_targets` to match), and the hidden states if return_hidden.
        """
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        pad = cfg.llm.pad_token_id
        if cfg.vision is None:
            if ecg is None or any(value is not None
                                  for value in (image, ecg_present, image_present)):
                raise ValueError("this model reads ECG signals only: it has no image tower "
                                 "(model.vision_tower), so every row needs its ECG")
            ids, mask, slots = expand_inputs(input_ids, attention_mask, ecg_position,
                                             cfg.num_ecg_tokens, pad)
            embeddings = self.encode_ecg(ecg)
        else:
            ecg, image, ecg_present, image_present = self.multimodal_inputs(
                input_ids.shape[0], ecg, image, ecg_present, image_present)
            ids, mask, slots = expand_multimodal_inputs(
                input_ids, attention_mask, ecg_position, ecg_present, image_present,
                cfg.num_ecg_tokens, cfg.num_image_tokens, pad)
            embeddings = self.encode_multimodal(ecg, image, ecg_present, image_present)
        return self.llm(ids, attention_mask=mask, extra_embeddings=embeddings,
                        extra_positions=slots, return_hidden=return_hidden)


def build_unified(model_config: Any) -> tuple[UniECG, UniECGConfig]:
    config = model_config if isinstance(model_config, UniECGConfig) else UniECGConfig.from_config(
        model_config)
    return UniECG(config), config
