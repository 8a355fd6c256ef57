"""Stage-2 alignment head: the LLM hidden states at the N `[ECG]` positions -> one vector in the
diffusion model's text-embedding space.

Two kinds, chosen by `model.alignment.kind`:
  mlp:          per-token Linear -> GELU -> Linear, then the mean over the N tokens.
  transformer:  GILL-style: the N hidden states are projected to `width`, `num_queries` learned
                queries are prepended, `layers` pre-LN transformer blocks run over [queries; tokens]
                (bidirectional), the query outputs are averaged and projected to the text width.

`DecisionHead` (`model.decision`, optional) reads the whole request the same way (`read_request`)
and gives the logit of answering it with `[ECG]` (generate) rather than in words.

`AttributeHead` (`model.attributes`, optional) reads the scalar conditions the diffusion model takes
beside the text embedding (heart rate in bpm, age in years, sex): the `[ECG]` hidden states query
the request's hidden states, so the numbers a request states or implies reach the UNet through the
LLM, not through a parser.

The hidden states are gathered with a fixed-size `jnp.nonzero(mask, size=N)` per row (the Gemma
trick), so nothing has a data-dependent shape and training and inference jit.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.layers.attention import bidirectional_attention
from uniecg_jax.layers.linear import DenseGeneral, matmul, to_dtype
from uniecg_jax.layers.norms import LayerNorm
from uniecg_jax.models.schema import ConfigSchema

ALIGNMENT_KINDS = ("mlp", "transformer")


@dataclasses.dataclass(frozen=True)
class AlignmentConfig(ConfigSchema):
    """Alignment head shape (`model.alignment`). `output_dim` = the text encoder's width (MiniLM:
    384)."""
    config_group = "model.alignment"
    kind: str = "mlp"
    hidden_dim: int = 512       # mlp hidden width / transformer width
    output_dim: int = 384
    layers: int = 2             # transformer only
    heads: int = 4              # transformer only
    num_queries: int = 4        # transformer only: learned queries (GILL)
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in ALIGNMENT_KINDS:
            raise ValueError(f"model.alignment.kind must be one of {ALIGNMENT_KINDS}, got {self.kind!r}")
        if self.kind == "transformer" and self.hidden_dim % self.heads:
            raise ValueError(f"model.alignment.hidden_dim={self.hidden_dim} is not divisible by "
                             f"model.alignment.heads={self.heads}")


@dataclasses.dataclass(frozen=True)
class AttributeConfig(ConfigSchema):
    """Attribute head shape (`model.attributes`): the `[ECG]` hidden states read the request ->
    heart rate, age, sex (`AttributeHead`). The raw outputs are standardised values; `*_center` /
    `*_scale` map them to bpm and years (so a fresh head predicts the centre, and the loss is O(1)
    for either quantity)."""
    config_group = "model.attributes"
    hidden_dim: int = 256       # read-out width (heads x head_dim) and MLP width
    heads: int = 4
    heart_rate_center: float = 75.0
    heart_rate_scale: float = 25.0
    age_center: float = 60.0
    age_scale: float = 20.0
    # Normalised read-out (LayerNorm on both inputs, unit-length queries and keys, a learned
    # per-head temperature); False is the unnormalised read-out of the checkpoints written before
    # this field, whose attention saturated on one token (`AttributeHead`).
    qk_norm: bool = True
    # Keys and values see each request token with the `context_window - 1` tokens before it: a
    # number spans several tokens ("1", "3", "0"), and a small LLM's state at its last digit does
    # not hold its value (the demo's stage-1 LLM: ridge probe r 0.55 from that state alone).
    context_window: int = 3
    # Keys / values also see the `lookahead` tokens after each request token (a number's last
    # digit is the one followed by a non-digit; the unit after it, " bpm" / " years", says which
    # attribute it is) and, with `read_embeddings`, each token's input embedding beside its final
    # state: the digits themselves. The demo's 3-layer LLM leaves a stated rate barely readable
    # in its final states (ridge probe r 0.55-0.75; head MAE 13 bpm against the regex's 0.3),
    # while the frozen embedding rows name each digit token exactly.
    lookahead: int = 1
    read_embeddings: bool = True
    # Heart rate and age may be read off a number the request writes in digits: per attribute,
    # a learned pointer over the request's numbers and "none" (`point_at_numbers`); the number's
    # value comes from its digit tokens (`number_features`; xVal's idea, Golkar et al. 2023:
    # numbers enter as values, not as pieces). The tokenizer splits a number into pieces
    # (" 1", "3", "0") whose embeddings name digits, not magnitudes: composing 130 from them
    # left the demo's head ~10 bpm off (regex: 0.3). Which number is the rate, which the age
    # and which neither ("12-lead"), and what to infer when none is stated, stay learned from
    # the words around them. `numerals`: the tokenizer's digit tokens as (id, text),
    # `data.tokenizer.numeral_pieces`, set by `train.stage2.finalize_stage2_config`.
    read_numbers: bool = True
    numerals: tuple = ()
    # Sex may be read off one word of the request ("woman", "male", "F") by the same kind of
    # pointer (`point_at_sex_words`): a learned query picks a request token or "none", and a
    # learned linear read of that token's features gives its male logit. Without it the demo's
    # read-out (the [ECG] states' queries over the whole request, then an MLP) learned no sex
    # at all: the same male logit for "a 60-year-old woman" and "man", stated-sex accuracy 0.53
    # (the best constant) against the regex's 0.87, while the toy test's 1-layer LLM read it.
    read_sex_words: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"

    @classmethod
    def from_config(cls, values=None, group: str | None = None, **derived) -> "AttributeConfig":
        """As `ConfigSchema.from_config`, except that a group without `qk_norm` (a checkpoint
        written before it: every config file states it, through `to_dict`) keeps the head those
        weights were trained as (`qk_norm=False`, `context_window=1`)."""
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values or {})
        if "qk_norm" not in values:
            values.update(qk_norm=False, context_window=1)
        if "read_embeddings" not in values:    # written before `lookahead` / `read_embeddings`
            values.update(lookahead=0, read_embeddings=False)
        if "read_numbers" not in values:       # written before `read_numbers`
            values.update(read_numbers=False)
        if "read_sex_words" not in values:     # written before `read_sex_words`
            values.update(read_sex_words=False)
        return super().from_config(values, group, **derived)

    def __post_init__(self):
        # Hashable (the config keys compiled functions), whatever a config file's lists were.
        object.__setattr__(self, "numerals", tuple((int(i), str(t)) for i, t in self.numerals))
        if self.hidden_dim % self.heads:
            raise ValueError(f"model.attributes.hidden_dim={self.hidden_dim} is not divisible by "
                             f"model.attributes.heads={self.heads}")
        if self.context_window < 1 or self.lookahead < 0:
            raise ValueError(f"model.attributes.context_window must be >= 1 and lookahead >= 0, "
                             f"got {self.context_window} and {self.lookahead}")
        if self.heart_rate_scale <= 0 or self.age_scale <= 0:
            raise ValueError("model.attributes.heart_rate_scale and age_scale must be > 0, got "
                             f"{self.heart_rate_scale} and {self.age_scale}")


@dataclasses.dataclass(frozen=True)
class DecisionConfig(ConfigSchema):
    """Decision read-out shape (`model.decision`; absent in checkpoints written before it, whose
    `[ECG0]` decision stays the LLM's own logit): `num_queries` learned queries read the whole
    request (`DecisionHead`, the attribute head's read-out) -> the logit of answering with
    `[ECG]`. Why: the frozen LLM's last state (all the `[ECG0]` row reads) called a never-trained
    report question ("My ECG report says: ... What should I make of it?") a generation request
    100% of the time under a logistic probe trained on 6 or 16 report-question phrasings; the
    words that say "question" sit earlier in the request."""
    config_group = "model.decision"
    hidden_dim: int = 128       # read-out width (heads x head_dim) and MLP width
    heads: int = 4
    num_queries: int = 2
    # As `AttributeConfig`: each request token with the tokens around it (a phrase, not a word),
    # and its input embedding beside its final state.
    context_window: int = 3
    lookahead: int = 1
    read_embeddings: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Always the normalised read-out (the unnormalised one collapsed onto one token).
    qk_norm = True

    def __post_init__(self):
        if self.hidden_dim % self.heads or self.num_queries < 1:
            raise ValueError(f"model.decision.hidden_dim={self.hidden_dim} must be divisible by "
                             f"model.decision.heads={self.heads} and num_queries "
                             f"({self.num_queries}) >= 1")
        if self.context_window < 1 or self.lookahead < 0:
            raise ValueError(f"model.decision.context_window must be >= 1 and lookahead >= 0, "
                             f"got {self.context_window} and {self.lookahead}")


def gather_ecg_hidden(hidden: jax.Array, input_ids: jax.Array, ecg_token_ids: Sequence[int]
                      ) -> tuple[jax.Array, jax.Array]:
    """Hidden states at the `[ECG]` token positions, in sequence order, with a fixed size.

    Args:
      hidden: [B, T, D] final hidden states.
      input_ids: [B, T] token ids.
      ecg_token_ids: the N `[ECG]` token ids.
    Returns:
      (gathered [B, N, D], valid [B, N] bool): row b's first N `[ECG]` positions; slots beyond the
      `[ECG]` tokens a row has are zeros with valid False.
    """
    count = len(ecg_token_ids)
    is_ecg = jnp.isin(input_ids, jnp.asarray(ecg_token_ids, jnp.int32))
    positions = jax.vmap(lambda row: jnp.nonzero(row, size=count, fill_value=-1)[0])(is_ecg)
    valid = positions >= 0
    gathered = jnp.take_along_axis(hidden, jnp.maximum(positions, 0)[..., None], axis=1)
    return jnp.where(valid[..., None], gathered, jnp.zeros_like(gathered)), valid


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """values [B, N, C], valid [B, N] -> [B, C] mean over valid slots (0 for a row with none)."""
    weights = valid.astype(jnp.float32)[..., None]
    return (values.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


def _dense(cfg, features, axes, name: str, axis=-1) -> DenseGeneral:
    """A biased DenseGeneral in `cfg`'s dtypes (called inside a compact `__call__`)."""
    return DenseGeneral(features, axes, axis=axis, use_bias=True, dtype=to_dtype(cfg.dtype),
                        param_dtype=to_dtype(cfg.param_dtype), name=name)


class _Block(nn.Module):
    """Pre-LN bidirectional transformer block over x [B, S, W] with a key mask [B, S]."""
    config: AlignmentConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        head_dim = cfg.hidden_dim // cfg.heads
        dense = functools.partial(_dense, cfg)
        norm = dict(dtype=dtype, param_dtype=param_dtype)
        normed = LayerNorm(name="attention_norm", **norm)(x)
        qkv_axes = ("embed", "q_heads", "head_dim")
        query = dense((cfg.heads, head_dim), qkv_axes, "query")(normed)
        key = dense((cfg.heads, head_dim), qkv_axes, "key")(normed)
        value = dense((cfg.heads, head_dim), qkv_axes, "value")(normed)
        attended = bidirectional_attention(query, key, value, dtype, key_mask)
        x = x + dense(cfg.hidden_dim, ("q_heads", "head_dim", "embed"), "out",
                      axis=(-2, -1))(attended)
        normed = LayerNorm(name="mlp_norm", **norm)(x)
        hidden = nn.gelu(dense(4 * cfg.hidden_dim, ("embed", "mlp"), "mlp_in")(normed))
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length",
                                                     "activation_mlp"))
        return x + dense(cfg.hidden_dim, ("mlp", "embed"), "mlp_out")(hidden)


class AlignmentHead(nn.Module):
    """[ECG] hidden states [B, N, D] (+ valid [B, N]) -> condition vector [B, output_dim] (f32)."""
    config: AlignmentConfig

    @nn.compact
    def __call__(self, ecg_hidden: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        if valid is None:
            valid = jnp.ones(ecg_hidden.shape[:2], bool)
        ecg_hidden = nn.with_logical_constraint(
            ecg_hidden, ("activation_batch", "activation_length", "activation_embed"))
        hidden = DenseGeneral(cfg.hidden_dim, ("embed", "mlp"), use_bias=True, dtype=dtype,
                              param_dtype=param_dtype, name="input")(ecg_hidden)
        if cfg.kind == "mlp":
            hidden = nn.gelu(hidden)
            out = DenseGeneral(cfg.output_dim, ("mlp", "embed"), use_bias=True, dtype=dtype,
                               param_dtype=param_dtype, out_dtype=jnp.float32, name="output")(hidden)
            return _masked_mean(out, valid)
        batch = ecg_hidden.shape[0]
        queries = self.param("queries", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (cfg.num_queries, cfg.hidden_dim),
            param_dtype)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(queries.astype(dtype), (batch, *queries.shape)), hidden.astype(dtype)],
            axis=1)
        key_mask = jnp.concatenate([jnp.ones((batch, cfg.num_queries), bool), valid], axis=1)
        for index in range(cfg.layers):
            tokens = _Block(cfg, name=f"block_{index}")(tokens, key_mask)
        pooled = LayerNorm(dtype=dtype, param_dtype=param_dtype, name="final_norm")(
            tokens[:, :cfg.num_queries]).mean(1)
        kernel = self.param("output_kernel", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("mlp", "embed")), (cfg.hidden_dim, cfg.output_dim),
            param_dtype)
        bias = self.param("output_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("embed",)), (cfg.output_dim,), param_dtype)
        return matmul(pooled, kernel, (1,), (0,), dtype, jnp.float32) + bias.astype(jnp.float32)


# Initial and largest temperature of the normalised read-out: the attention logits are
# temperature x cos(query, key), so they start within +-10 (soft over a ~50-token request) and can
# sharpen, but never to the one-hot softmax whose gradient vanishes.
ATTRIBUTE_TEMPERATURE_INIT = 10.0
ATTRIBUTE_TEMPERATURE_MAX = 50.0


def _shifted(x: jax.Array, shift: int) -> jax.Array:
    """x [B, T, ...] moved `shift` steps along T (> 0: position t holds t - shift), zero-filled."""
    if shift == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (shift, 0) if shift > 0 else (0, -shift)
    padded = jnp.pad(x, pad)
    return padded[:, :x.shape[1]] if shift > 0 else padded[:, -shift:]


def _windowed(context: jax.Array, mask: jax.Array, window: int, lookahead: int = 0) -> jax.Array:
    """context [B, T, D], mask [B, T] -> [B, T, (window + lookahead) * D]: each token's state
    beside those of the `window - 1` tokens before it and the `lookahead` tokens after it (zeros
    where those are not request tokens)."""
    parts = [context]
    for shift in [*range(1, window), *range(-1, -lookahead - 1, -1)]:
        kept = _shifted(mask, shift)
        parts.append(jnp.where(kept[..., None], _shifted(context, shift), 0).astype(context.dtype))
    return jnp.concatenate(parts, axis=-1)


def _unit(x: jax.Array) -> jax.Array:
    """x [..., Dh] scaled to unit length along the last axis (f32). Not `ecg_clip.normalize`: its
    norm has a NaN gradient at an all-zero vector (a padded request token's key), this one not."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-6)


# Numbers are read over at most this many tokens (a 3-digit rate is 3 pieces in a digit-splitting
# tokenizer); the value feature saturates at NUMBER_MAX, far above any heart rate or age.
NUMBER_MAX_PIECES = 8
NUMBER_MAX = 1000.0


def number_features(input_ids: jax.Array, numerals: Sequence[tuple[int, str]]) -> jax.Array:
    """input_ids [B, T] -> [B, T, 2] f32: at the last token of each number written in digits,
    (min(value, NUMBER_MAX) / 100, 1); 0 elsewhere. `numerals`: the tokenizer's digit tokens as
    (id, text) (`data.tokenizer.numeral_pieces`); a piece without a leading space continues the
    number of the piece before it when that is a numeral too (" 1", "3", "0" -> 130 at "0"; "▁",
    "1", "3", "0" as well, "▁" not being a numeral)."""
    batch, length = input_ids.shape
    if not numerals:
        return jnp.zeros((batch, length, 2), jnp.float32)
    numerals = sorted(numerals)
    ids = jnp.asarray([i for i, _ in numerals], jnp.int32)
    values = jnp.asarray([float(t.strip()) for _, t in numerals], jnp.float32)
    scales = jnp.asarray([10.0 ** len(t.strip()) for _, t in numerals], jnp.float32)
    joins = jnp.asarray([not t.startswith(" ") for _, t in numerals])
    slot = jnp.clip(jnp.searchsorted(ids, input_ids), 0, len(numerals) - 1)
    is_numeral = ids[slot] == input_ids
    value = jnp.where(is_numeral, values[slot], 0.0)
    continues = is_numeral & joins[slot] & _shifted(is_numeral, 1)
    # The number ending at t: sum over k of value[t - k] * 10^(digits of tokens t-k+1 .. t), for
    # as long as each of those tokens continues the one before it.
    number, scale, alive = value, jnp.where(is_numeral, scales[slot], 1.0), continues
    for k in range(1, NUMBER_MAX_PIECES):
        number = number + jnp.where(alive, _shifted(value, k) * scale, 0.0)
        scale = jnp.minimum(scale * jnp.where(alive, _shifted(scales[slot], k), 1.0), 1e30)
        alive = alive & _shifted(continues, k)
    number = jnp.where(alive, NUMBER_MAX, number)   # longer than NUMBER_MAX_PIECES: saturate
    ends = is_numeral & ~_shifted(continues, -1)
    return jnp.stack([jnp.where(ends, jnp.minimum(number, NUMBER_MAX) / 100.0, 0.0),
                      ends.astype(jnp.float32)], axis=-1)


def request_features(module: nn.Module, cfg, context: jax.Array, context_mask: jax.Array,
                     token_embeddings: jax.Array | None = None) -> jax.Array:
    """What `read_request` (and the attribute head's number pointer) read of each request token,
    called inside a head's compact `__call__` (its LayerNorms are the head's): the final states
    (context [B, T, D]; LayerNormed with `cfg.qk_norm`), with `cfg.read_embeddings` beside the
    input embeddings (token_embeddings [B, T, D], LayerNormed apart), each with the
    `context_window - 1` request tokens before it and `lookahead` after it (context_mask [B, T],
    True = a request token) -> [B, T, F]."""
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    if cfg.qk_norm:
        context = LayerNorm(name="context_norm", dtype=dtype, param_dtype=param_dtype)(context)
    if cfg.read_embeddings:
        if token_embeddings is None:
            raise ValueError(f"{cfg.config_group}.read_embeddings needs the request's "
                             "token_embeddings [B, T, D]")
        embedded = LayerNorm(name="embedding_norm", dtype=dtype, param_dtype=param_dtype)(
            jax.lax.stop_gradient(token_embeddings))
        context = jnp.concatenate([context, embedded.astype(context.dtype)], axis=-1)
    if cfg.context_window > 1 or cfg.lookahead:
        context = _windowed(context, context_mask, cfg.context_window, cfg.lookahead)
    return context


def _temperature(module: nn.Module, name: str, count: int) -> jax.Array:
    """A learned per-head softmax temperature [count] (init ATTRIBUTE_TEMPERATURE_INIT, capped)."""
    log_temperature = module.param(name, nn.with_logical_partitioning(
        nn.initializers.constant(jnp.log(ATTRIBUTE_TEMPERATURE_INIT)), ("q_heads",)),
        (count,), jnp.float32)
    return jnp.exp(jnp.minimum(log_temperature, jnp.log(ATTRIBUTE_TEMPERATURE_MAX)))


def read_request(module: nn.Module, cfg, queries: jax.Array, features: jax.Array,
                 context_mask: jax.Array) -> jax.Array:
    """The request read-out of `AttributeHead` and `DecisionHead`, called inside their compact
    `__call__` (its submodules and `log_temperature` are theirs, so the attribute head keeps its
    parameter names): `queries` [B, Q, D] attend over the request tokens' `request_features`
    (features [B, T, F], context_mask [B, T] True = a request token). `cfg`: the read-out fields
    of `AttributeConfig` (hidden_dim, heads, qk_norm, read_embeddings, context_window,
    lookahead, dtypes). Returns [B, Q, heads, head_dim]."""
    dtype = to_dtype(cfg.dtype)
    head_dim = cfg.hidden_dim // cfg.heads
    dense = functools.partial(_dense, cfg)
    qkv_axes = ("embed", "q_heads", "head_dim")
    query = dense((cfg.heads, head_dim), qkv_axes, "query")(queries)
    key = dense((cfg.heads, head_dim), qkv_axes, "key")(features)
    value = dense((cfg.heads, head_dim), qkv_axes, "value")(features)
    if cfg.qk_norm:
        temperature = _temperature(module, "log_temperature", cfg.heads)
        # bidirectional_attention divides the logits by sqrt(Dh): fold it back in.
        query = _unit(query) * (temperature[:, None] * head_dim ** 0.5)
        key = _unit(key)
    return bidirectional_attention(query, key, value, dtype, context_mask)


POINTED_ATTRIBUTES = ("heart_rate", "age")


def _point(module: nn.Module, cfg, name: str, features: jax.Array, candidates: jax.Array,
           values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A pointer per output (Q of them): a learned unit query `{name}_queries` [Q, Dh] against
    each request token's unit key (`{name}_key` of its features [B, T, F]) at a learned
    temperature, a softmax over the `candidates` [B, T] tokens and a learned "none" logit
    (`{name}_none`, 0 at init) -> (the weighted sum of `values` [B, T, Q] over the candidates
    [B, Q], the weight on "none" [B, Q]). No candidate: "none" takes it all."""
    count = values.shape[-1]
    head_dim = cfg.hidden_dim // cfg.heads
    key = _unit(_dense(cfg, (count, head_dim), ("embed", "q_heads", "head_dim"),
                       f"{name}_key")(features))
    query = _unit(module.param(f"{name}_queries", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("q_heads", "head_dim")), (count, head_dim), jnp.float32))
    logits = _temperature(module, f"{name}_log_temperature", count) * jnp.einsum(
        "btad,ad->bta", key, query)
    logits = jnp.where(candidates[..., None], logits, -jnp.inf)
    none = module.param(f"{name}_none", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("q_heads",)), (count,), jnp.float32)
    logits = jnp.concatenate([logits, jnp.broadcast_to(none, (logits.shape[0], 1, count))], 1)
    weights = jax.nn.softmax(logits, axis=1)
    return jnp.sum(weights[:, :-1] * values, axis=1), weights[:, -1]


def point_at_numbers(module: nn.Module, cfg, features: jax.Array, numbers: jax.Array,
                     context_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per attribute of POINTED_ATTRIBUTES, a pointer (`_point`) over the request's numbers and
    "none": the words around a number (its `request_features`) say whether it is a rate, an age
    or "12-lead". features [B, T, F], numbers [B, T, 2] (`number_features`), context_mask
    [B, T] -> (the pointed value [B, A]: the weighted sum of the numbers, in their own units;
    the weight on "none" [B, A]). With no number in the request, "none" takes it all."""
    values = jnp.broadcast_to(100.0 * numbers[..., :1],   # `number_features` keeps value / 100
                              (*numbers.shape[:2], len(POINTED_ATTRIBUTES)))
    return _point(module, cfg, "number", features, context_mask & (numbers[..., 1] > 0), values)


def point_at_sex_words(module: nn.Module, cfg, features: jax.Array, context_mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """A pointer (`_point`) over the request tokens and "none" for the word that states the sex;
    each token's value is a learned linear male logit of its features (`sex_value`).
    features [B, T, F], context_mask [B, T] -> (the pointed male logit [B], the weight on
    "none" [B])."""
    values = _dense(cfg, 1, ("embed", None), "sex_value")(features).astype(jnp.float32)
    value, none = _point(module, cfg, "sex", features, context_mask, values)
    return value[:, 0], none[:, 0]


class AttributeHead(nn.Module):
    """Heart rate, age and sex read by the `[ECG]` hidden states from the request.

    Each of the N `[ECG]` states queries the request's hidden states (`heads` x `head_dim`
    cross-attention; keys / values from the request), the N answers side by side -> Linear ->
    GELU -> Linear(3). Why a read-out and not an MLP on the `[ECG]` states alone: on the tiny
    test LLM those states vary across requests by ~3% of their size (they are dominated by the
    `[ECG]` embedding itself), and an MLP on them stayed at the mean rate after 80 steps although
    a ridge probe could read the rate from them (held-out correlation 0.88): the numbers are
    spelled out in the request's own states, which the queries learn to find.

    With `qk_norm` (the default) both inputs are LayerNormed, queries and keys are scaled to unit
    length per head and the logits are a learned per-head temperature (`log_temperature`, capped
    at ATTRIBUTE_TEMPERATURE_MAX) x their cosine. Without it (checkpoints written before) the
    logits are q.k / sqrt(Dh) of unnormalised projections: Adam grows both kernels together, the
    logits' spread went from ~0.06 at init to ~45 in the demo, the softmax turned one-hot on one
    token (":" or "<s>") whose state is the same in every request, its gradient vanished, and the
    head predicted the mean rate whatever the request said.

    With `read_embeddings`, each request token's input embedding (`token_embeddings`, LayerNormed
    apart) joins its final state before the window, so keys and values see which digits a number
    is made of: the demo's small LLM keeps a stated number only faintly in its final states.

    ecg_hidden [B, N, D], valid [B, N], context [B, T, D], context_mask [B, T] (True = a request
    token), token_embeddings [B, T, D] (the request's input embeddings; needed with
    `read_embeddings`), numbers [B, T, 2] (`number_features` of the request; needed with
    `read_numbers`) -> {"heart_rate": [B] bpm, "age": [B] years, "male_logit": [B]} (f32)."""
    config: AttributeConfig

    @nn.compact
    def __call__(self, ecg_hidden: jax.Array, valid: jax.Array, context: jax.Array,
                 context_mask: jax.Array, token_embeddings: jax.Array | None = None,
                 numbers: jax.Array | None = None) -> dict:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        dense = functools.partial(_dense, cfg)
        if cfg.qk_norm:
            ecg_hidden = LayerNorm(name="query_norm", dtype=dtype, param_dtype=param_dtype)(
                ecg_hidden)
        features = request_features(self, cfg, context, context_mask, token_embeddings)
        read = read_request(self, cfg, ecg_hidden, features, context_mask)
        read = jnp.where(valid[:, :, None, None], read, jnp.zeros_like(read))
        hidden = nn.gelu(dense(cfg.hidden_dim, (None, "q_heads", "head_dim", "mlp"), "input",
                               axis=(-3, -2, -1))(read))
        raw = DenseGeneral(3, ("mlp", None), use_bias=True, dtype=dtype, param_dtype=param_dtype,
                           out_dtype=jnp.float32, name="output")(hidden)
        inferred = jnp.stack([cfg.heart_rate_center + cfg.heart_rate_scale * raw[:, 0],
                              cfg.age_center + cfg.age_scale * raw[:, 1]], axis=-1)
        if cfg.read_numbers:
            if numbers is None:
                raise ValueError("model.attributes.read_numbers needs the request's numbers "
                                 "[B, T, 2] (`number_features`)")
            pointed, none = point_at_numbers(self, cfg, features, numbers, context_mask)
            inferred = none * inferred + pointed
        male_logit = raw[:, 2]
        if cfg.read_sex_words:
            pointed, none = point_at_sex_words(self, cfg, features, context_mask)
            male_logit = none * male_logit + pointed
        return {"heart_rate": inferred[:, 0], "age": inferred[:, 1], "male_logit": male_logit}


class DecisionHead(nn.Module):
    """The logit of answering a request with `[ECG]` (generate) rather than in words, read from
    the whole request: `num_queries` learned queries attend over the request tokens
    (`read_request`, as the attribute head reads them); their reads and the last request token's
    state -> Linear -> GELU -> Linear(1).

    context [B, T, D] final states, context_mask [B, T] (True = a request token: the prompt up to
    the position that predicts the first answer token), token_embeddings [B, T, D] (with
    `read_embeddings`) -> logit [B] f32."""
    config: DecisionConfig

    @nn.compact
    def __call__(self, context: jax.Array, context_mask: jax.Array,
                 token_embeddings: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        queries = self.param("queries", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, "embed")), (cfg.num_queries, context.shape[-1]),
            param_dtype)
        queries = jnp.broadcast_to(queries.astype(dtype), (context.shape[0], *queries.shape))
        read = read_request(self, cfg, queries,
                            request_features(self, cfg, context, context_mask, token_embeddings),
                            context_mask)
        # Beside the pooled read, the last request token's state (all the [ECG0] row read
        # before): it alone says where the request ends (a follow-up's earlier question turn is
        # in the request too).
        index = jnp.arange(context.shape[1])
        last = jnp.max(jnp.where(context_mask, index, 0), axis=1)
        last = jnp.take_along_axis(context, last[:, None, None], axis=1)[:, 0]
        last = LayerNorm(name="last_norm", dtype=dtype, param_dtype=param_dtype)(last)
        hidden = nn.gelu(_dense(cfg, cfg.hidden_dim, (None, "q_heads", "head_dim", "mlp"), "input",
                                axis=(-3, -2, -1))(read)
                         + _dense(cfg, cfg.hidden_dim, ("embed", "mlp"), "last")(last))
        return DenseGeneral(1, ("mlp", None), use_bias=True, dtype=dtype, param_dtype=param_dtype,
                            out_dtype=jnp.float32, name="output")(hidden)[:, 0]
