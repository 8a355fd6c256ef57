"""The stage-2 (unified) UniECG model: the stage-1 ECG tower + decoder, plus the `[ECG]` generation
tokens and the alignment head that maps their hidden states onto the diffusion text space.

Params: {"ecg_tower", "llm", "alignment"} (+ "attributes" when `model.attributes` is set: the head
that reads heart rate, age and sex from the same `[ECG]` hidden states; + "decision" when
`model.decision` is set: the read-out over the whole request that decides whether the first answer
token is `[ECG0]`, `UniECGStage2.decide_first_token`); the first two are exactly stage 1's (`UniECG`), with
`llm/embedding` (and an untied `llm/lm_head/kernel`) grown by the N `[ECG]` rows. Interpretation runs
the stage-1 `UniECG` on `stage1_params(params)`, so it is the stage-1 computation by construction.

    model, cfg = build_stage2(config.model)            # config.model.ecg_token_ids set
    logits, condition, valid = model.apply({"params": p}, ids, mask)   # text-only generation path
    attributes = model.apply({"params": p}, hidden, ids, method=UniECGStage2.attributes_of)

Vocabulary extension of a stage-1 checkpoint: `convert.hf_llm.add_tokens(llm_params, llm_config,
tokenizer, data.chat_format.ecg_token_names(N))` (rows initialised with the mean of the old ones).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.layers.params import abstract_params
from uniecg_jax.models.alignment import (AlignmentConfig, AlignmentHead, AttributeConfig,
                                         AttributeHead, DecisionConfig, DecisionHead,
                                         gather_ecg_hidden, number_features)
from uniecg_jax.models.ecg_encoder import ECGTower
from uniecg_jax.models.llm import Decoder
from uniecg_jax.models.schema import ConfigError, check_group_keys
from uniecg_jax.models.stage1 import UNIECG_GROUPS, UniECG, UniECGConfig

STAGE1_KEYS = ("ecg_tower", "llm")


@dataclasses.dataclass(frozen=True)
class Stage2Config:
    """UniECG shapes + alignment head + the `[ECG]` token ids (static: they define the gather)
    + the attribute head (None: a model without one, as every stage-2 model before it)
    + the decision read-out (None: `[ECG0]` is decided by the LLM's own logit, as in every
    checkpoint written before it)."""
    unified: UniECGConfig
    alignment: AlignmentConfig
    ecg_token_ids: tuple[int, ...]
    attributes: AttributeConfig | None = None
    decision: DecisionConfig | None = None

    @classmethod
    def from_config(cls, model_config: Any, group: str = "model") -> "Stage2Config":
        """From `config.model`: the stage-1 groups (llm, ecg_encoder, projector), `alignment`,
        `num_ecg_tokens`, `ecg_token_ids` and the optional `attributes` and `decision` (any
        other key is an error)."""
        values = check_group_keys(
            model_config, UNIECG_GROUPS + ("alignment", "num_ecg_tokens", "ecg_token_ids",
                                           "attributes", "decision"), group)
        ids = values.get("ecg_token_ids") or ()
        count = values.get("num_ecg_tokens")
        if not isinstance(count, int) or not all(isinstance(i, int) for i in ids):
            raise ConfigError(f"{group}.num_ecg_tokens must be an integer and {group}.ecg_token_ids"
                              f" a list of integers, got {count!r} and {ids!r}")
        if len(ids) != count:
            raise ConfigError(f"{group}.ecg_token_ids has {len(ids)} ids but "
                              f"{group}.num_ecg_tokens is {count}; build the config with "
                              "train.stage2.finalize_stage2_config")
        unified = UniECGConfig.from_config({k: values[k] for k in UNIECG_GROUPS if k in values},
                                           group)
        if max(ids) >= unified.llm.vocab_size:
            raise ConfigError(f"[ECG] token id {max(ids)} is outside the vocabulary "
                              f"({group}.llm.vocab_size={unified.llm.vocab_size})")
        attributes, decision = values.get("attributes"), values.get("decision")
        return cls(unified, AlignmentConfig.from_config(values.get("alignment"),
                                                        f"{group}.alignment"), tuple(ids),
                   None if attributes is None
                   else AttributeConfig.from_config(attributes, f"{group}.attributes"),
                   None if decision is None
                   else DecisionConfig.from_config(decision, f"{group}.decision"))

    @property
    def num_ecg_tokens(self) -> int:
        return len(self.ecg_token_ids)


class UniECGStage2(nn.Module):
    """ECG tower + decoder LLM + alignment head (+ attribute head)."""
    config: Stage2Config

    def setup(self):
        unified = self.config.unified
        self.ecg_tower = ECGTower(unified.encoder, unified.projector)
        self.llm = Decoder(unified.llm)
        self.alignment = AlignmentHead(self.config.alignment)
        if self.config.attributes is not None:
            self.attributes = AttributeHead(self.config.attributes)
        if self.config.decision is not None:
            self.decision = DecisionHead(self.config.decision)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 extra_embeddings: jax.Array | None = None,
                 extra_positions: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Forward pass of the generation path (text only, or with ECG tokens spliced in).

        Args:
          input_ids: [B, T] with the N `[ECG]` tokens somewhere (teacher forcing, or prompt +
            generated tokens at inference).
          attention_mask: [B, T] 1 = real token.
          extra_embeddings [B, E, D] / extra_positions [B, E]: ECG tokens written into the
            sequence (the Decoder's splice), when the request came with an ECG.
        Returns:
          logits [B, T, V] f32, condition [B, text_dim] f32 (alignment head on the hidden states at
          the `[ECG]` positions), valid [B, N] bool (which `[ECG]` slots were found).
        """
        logits, hidden = self.llm(input_ids, attention_mask=attention_mask,
                                  extra_embeddings=extra_embeddings,
                                  extra_positions=extra_positions, return_hidden=True)
        return (logits, *self.align(hidden, input_ids))

    def align(self, hidden: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """hidden [B, T, D] + ids [B, T] -> (condition [B, text_dim], valid [B, N])."""
        ecg_hidden, valid = gather_ecg_hidden(hidden, input_ids, self.config.ecg_token_ids)
        return self.alignment(ecg_hidden, valid), valid

    def attributes_of(self, hidden: jax.Array, input_ids: jax.Array) -> dict:
        """hidden [B, T, D] + ids [B, T] -> the attribute head's {"heart_rate", "age",
        "male_logit"}, each [B] f32 (see `models.alignment.AttributeHead`): the `[ECG]` states
        read the request, i.e. the tokens before the first `[ECG]` that are not padding (left
        padding at serving, right padding in training; a real token equal to the pad id is only
        hidden from the read-out)."""
        if self.config.attributes is None:
            raise ConfigError("this stage-2 model has no attribute head (model.attributes unset)")
        ecg_hidden, valid = gather_ecg_hidden(hidden, input_ids, self.config.ecg_token_ids)
        is_ecg = jnp.isin(input_ids, jnp.asarray(self.config.ecg_token_ids, jnp.int32))
        before_ecg = jnp.cumsum(is_ecg, axis=1) == 0
        request = before_ecg & (input_ids != self.config.unified.llm.pad_token_id)
        cfg = self.config.attributes
        embeddings = self.llm.embed(input_ids) if cfg.read_embeddings else None
        numbers = number_features(input_ids, cfg.numerals) if cfg.read_numbers else None
        return self.attributes(ecg_hidden, valid, hidden, request, embeddings, numbers)

    def decide_first_token(self, logits: jax.Array, hidden: jax.Array, input_ids: jax.Array,
                           request_mask: jax.Array) -> jax.Array:
        """The logits of a request's first answer token with the decision read-out's verdict:
        logits [B, V] (at the last request position), hidden / input_ids [B, T(, D)], request_mask
        [B, T] (True = a request token) -> [B, V] f32 with p([ECG0]) = sigmoid(`DecisionHead`
        logit) (`with_decision`). Unchanged without a read-out (`model.decision` unset)."""
        if self.config.decision is None:
            return logits
        embeddings = self.llm.embed(input_ids) if self.config.decision.read_embeddings else None
        decision = self.decision(hidden, request_mask, embeddings)
        return with_decision(logits, decision, self.config.ecg_token_ids[0])

    def generate_outputs(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                         decision_positions: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array, dict | None]:
        """`__call__` plus the attribute head: (logits [B, T, V], condition [B, text_dim],
        valid [B, N], attributes {name: [B]} or None without a head). One decoder pass.

        decision_positions [B] (-1: none): where each row's answer is decided (the position that
        predicts its first token); with a decision read-out the logits there are
        `decide_first_token`'s, the request being the non-padding tokens up to that position (as
        `decoding.generate` serves a prompt: `inference.chat.decision_hook`)."""
        logits, hidden = self.llm(input_ids, attention_mask=attention_mask, return_hidden=True)
        condition, valid = self.align(hidden, input_ids)
        attributes = (None if self.config.attributes is None
                      else self.attributes_of(hidden, input_ids))
        if self.config.decision is not None and decision_positions is not None:
            index = jnp.arange(input_ids.shape[1])
            real = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask) > 0
            request = real & (index[None, :] <= decision_positions[:, None])
            at = jnp.maximum(decision_positions, 0)[:, None, None]
            decided = self.decide_first_token(
                jnp.take_along_axis(logits, at, axis=1)[:, 0], hidden, input_ids, request)
            rows = (decision_positions >= 0)[:, None, None] & (index[None, :, None] == at)
            logits = jnp.where(rows, decided[:, None, :].astype(logits.dtype), logits)
        return logits, condition, valid, attributes

    def init_all(self, input_ids, ecg, ecg_position):
        """Touches every submodule (for `init`); interpretation itself runs `UniECG` on
        `stage1_params(params)` (`stage1_model`)."""
        del ecg_position
        if self.config.attributes is not None or self.config.decision is not None:
            last = jnp.full(input_ids.shape[:1], input_ids.shape[1] - 1, jnp.int32)
            return self.ecg_tower(ecg), self.generate_outputs(input_ids, decision_positions=last)
        return self.ecg_tower(ecg), self(input_ids)


def with_decision(logits: jax.Array, decision: jax.Array, token_id: int) -> jax.Array:
    """logits [B, V] with row b's `token_id` logit set so that softmax gives it probability
    sigmoid(decision[b]) ([B]) and the other tokens keep their ratios (the words an answer in
    words would start with are the LLM's own). f32."""
    logits = logits.astype(jnp.float32)
    others = jax.nn.logsumexp(logits.at[:, token_id].set(-jnp.inf), axis=-1)
    return logits.at[:, token_id].set(others + decision.astype(jnp.float32))


def build_stage2(model_config: Any) -> tuple[UniECGStage2, Stage2Config]:
    config = model_config if isinstance(model_config, Stage2Config) else Stage2Config.from_config(
        model_config)
    return UniECGStage2(config), config


def init_stage2_params(model: UniECGStage2, rng: jax.Array, text_length: int = 8) -> Any:
    """Boxed params (logical partitioning kept) of the whole stage-2 model."""
    enc = model.config.unified.encoder
    return model.init(rng, jnp.zeros((1, text_length), jnp.int32),
                      jnp.zeros((1, enc.num_leads, enc.num_samples)), jnp.zeros((1,), jnp.int32),
                      method=UniECGStage2.init_all)["params"]


def abstract_stage2_params(model: UniECGStage2, sharding: Any = None) -> Any:
    """ShapeDtypeStructs of the unboxed params (on `sharding` when given), without allocating."""
    return abstract_params(lambda key: init_stage2_params(model, key), jax.random.PRNGKey(0),
                           sharding=sharding)


def stage1_params(params: Any) -> dict:
    """The `UniECG` (stage-1) subtree of stage-2 params: {"ecg_tower", "llm"}."""
    return {key: params[key] for key in STAGE1_KEYS}


def stage1_model(config: Stage2Config) -> UniECG:
    """The stage-1 model that runs interpretation on `stage1_params(params)`."""
    return UniECG(config.unified)
