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

Params: {"ecg_tower": {"encoder", "projector"}, "llm": <Decoder params>}; the LLM subtree is exactly
the Decoder's, so HF conversion applies to `params["llm"]` unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.models.ecg_encoder import ECGEncoderConfig, ECGTower, ProjectorConfig
from uniecg_jax.models.llm import Decoder, LLMConfig
from uniecg_jax.models.schema import InputFormatConfig, check_group_keys

UNIECG_GROUPS = ("llm", "ecg_encoder", "projector", "input")


@dataclasses.dataclass(frozen=True)
class UniECGConfig:
    llm: LLMConfig
    encoder: ECGEncoderConfig
    projector: ProjectorConfig
    input: InputFormatConfig = InputFormatConfig()

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
        return cls(llm, encoder, projector,
                   InputFormatConfig.from_config(values.get("input"), f"{group}.input"))

    @property
    def num_ecg_tokens(self) -> int:
        """E: LLM positions one ECG occupies (CLS + patches)."""
        return self.encoder.num_tokens


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


class UniECG(nn.Module):
    """ECG tower + decoder LLM."""
    config: UniECGConfig

    def setup(self):
        self.ecg_tower = ECGTower(self.config.encoder, self.config.projector)
        self.llm = Decoder(self.config.llm)

    def encode_ecg(self, ecg: jax.Array) -> jax.Array:
        """ecg [B, leads, samples] float32 mV -> LLM-width ECG tokens [B, E, D]."""
        return self.ecg_tower(ecg)

    def __call__(self, input_ids: jax.Array, ecg: jax.Array, ecg_position: jax.Array,
                 attention_mask: jax.Array | None = None, return_hidden: bool = False):
        """Teacher-forced forward pass.

        Args:
          input_ids: [B, T] with one `<ecg>` placeholder per row at `ecg_position` [B].
          ecg: [B, leads, samples].
          attention_mask: [B, T] 1 = real token.
        Returns:
          logits [B, T + E - 1, V] float32 over the expanded sequence (expand targets and loss
          masks with `expand_at_placeholder` to match), and the hidden states if return_hidden.
        """
        num_ecg = self.config.num_ecg_tokens
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        ids, mask, slots = expand_inputs(input_ids, attention_mask, ecg_position, num_ecg,
                                         self.config.llm.pad_token_id)
        return self.llm(ids, attention_mask=mask, extra_embeddings=self.encode_ecg(ecg),
                        extra_positions=slots, return_hidden=return_hidden)


def build_unified(model_config: Any) -> tuple[UniECG, UniECGConfig]:
    config = model_config if isinstance(model_config, UniECGConfig) else UniECGConfig.from_config(
        model_config)
    return UniECG(config), config
