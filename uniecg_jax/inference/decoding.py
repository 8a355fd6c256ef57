"""Batched autoregressive decoding: one prefill plus a KV-cached token loop on device.

    out = generate(model, params, input_ids, attention_mask, max_new_tokens=64,
                   stop_token_ids=(eos_id,), sampling=Sampling(temperature=0.7, top_p=0.9), rng=key)
    out.tokens   # [B, max_new_tokens] int32, pad_token_id after each row's stop token
    out.lengths  # [B] int32, generated tokens per row (the stop token included)

Prompts are LEFT-padded (`left_pad` builds them from lists): every row's last prompt token then sits
in the same cache slot, so all rows write the same slot each step (no per-row scatter), and RoPE
positions count only real tokens (row b's first new token has position = its prompt length), which is
what `transformers.generate` does with left padding, so greedy outputs are token-identical.

The whole thing — prefill, then a `lax.while_loop` that samples, appends, updates the cache and stops
when every row has emitted a stop token or `max_new_tokens` are out — is one jitted function per
(model config, max_new_tokens, sampling, stop ids); prompt shapes retrace as usual.
`extra_embeddings [B, N, D]` / `extra_positions [B, N]` (indices into the padded prompt, -1 unused)
are spliced into the prompt embeddings at prefill (ECG tokens in stage 1). `first_token` =
(hook, hook_params) rewrites the first token's logits from the prompt's hidden states inside the
same jit (stage 2's decision read-out: `inference.chat.decision_hook`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.kernels import decode_attention, small_batch_matmul
from uniecg_jax.models.llm import Decoder, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1.0 = off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class GenerateOutput(NamedTuple):
    tokens: jax.Array    # [B, max_new_tokens] int32
    lengths: jax.Array   # [B] int32
    # With return_hidden: final hidden states [B, T + max_new_tokens, D] of the prompt and of every
    # generated token (computed when the token is fed back; zeros where never fed).
    hidden: jax.Array | None = None


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (input_ids [B, T], attention_mask [B, T]) left-padded to `length`
    (default the longest)."""
    length = length or max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_token_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"prompt {row} has {len(seq)} tokens, more than length={length}")
        if len(seq):
            ids[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = 1
    return ids, mask


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] f32 -> temperature-scaled logits with top-k / top-p tails set to -inf."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_logits = jnp.where(mass_before >= sampling.top_p, -jnp.inf, sorted_logits)
        logits = jnp.full_like(logits, -jnp.inf).at[
            jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return logits


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (first maximum; first NaN if any) as two plain reductions.

    XLA:CPU lowers argmax to a variadic (value, index) reduce that runs ~3x slower than a max
    followed by a min over matching indices: 0.6 vs 0.2 ms per step for [8, 32000] logits, ~3% of
    a batch-8 decode step of the 60M benchmark model.
    """
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    hit = (logits == best) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def sample_tokens(logits: jax.Array, sampling: Sampling, rng: jax.Array) -> jax.Array:
    """logits [B, V] -> token ids [B] int32."""
    if sampling.greedy:
        return greedy_tokens(logits)
    return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def _generate_impl(model: Decoder, max_new_tokens: int, sampling: Sampling,
                   stop_token_ids: tuple[int, ...], pad_token_id: int, small_batch_kernel: bool,
                   return_hidden: bool, attention_kernel: bool, first_token_hook, params: Any,
                   input_ids: jax.Array, attention_mask: jax.Array,
                   extra_embeddings: jax.Array | None, extra_positions: jax.Array | None,
                   rng: jax.Array, hook_params: Any = None) -> GenerateOutput:
    batch, prompt_len = input_ids.shape
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens)
    stops = jnp.asarray(stop_token_ids or (-1,), jnp.int32)

    logits, *prompt_hidden, cache = model.apply(
        {"params": params}, input_ids, attention_mask=attention_mask,
        extra_embeddings=extra_embeddings, extra_positions=extra_positions, cache=cache,
        only_last=True, return_hidden=return_hidden or first_token_hook is not None)
    first_logits = logits[:, -1]
    if first_token_hook is not None:
        first_logits = first_token_hook(hook_params, prompt_hidden[0], input_ids, attention_mask,
                                        first_logits)
    # Every Dense kernel packed once for small_batch_matmul (a second copy of the weights while
    # this call runs), injected into the decode step below.
    packed = (small_batch_matmul.packed_dense_kernels(model, params, input_ids[:, -1:])
              if small_batch_kernel else None)
    rng, step_rng = jax.random.split(rng)
    first = sample_tokens(first_logits, sampling, step_rng)
    tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops)
    lengths = jnp.ones((batch,), jnp.int32)

    def cond(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def feed(step, tokens, cache, hidden):
        """Runs token `step - 1` through the model (its hidden state kept when asked)."""
        previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)      # [B, 1]
        with small_batch_matmul.packed_kernels_injected(packed), \
                decode_attention.injected(attention_kernel):
            logits, *fed_hidden, cache = model.apply(
                {"params": params}, previous, attention_mask=jnp.ones_like(previous), cache=cache,
                return_hidden=return_hidden)
        if return_hidden:
            hidden = jax.lax.dynamic_update_slice_in_dim(
                hidden, fed_hidden[0].astype(hidden.dtype), step - 1, axis=1)
        return logits, cache, hidden

    def body(state):
        step, tokens, done, lengths, cache, rng, hidden = state
        logits, cache, hidden = feed(step, tokens, cache, hidden)
        rng, step_rng = jax.random.split(rng)
        token = sample_tokens(logits[:, -1], sampling, step_rng)
        token = jnp.where(done, pad_token_id, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stops)
        return step + 1, tokens, done, lengths, cache, rng, hidden

    # The generated tokens' hidden states (return_hidden): a token's is computed when it is fed
    # back, so the loop fills all but the last one and one more step feeds that (its cache slot
    # exists: the cache holds prompt + max_new_tokens).
    hidden = (jnp.zeros((batch, max_new_tokens, prompt_hidden[0].shape[-1]), jnp.float32)
              if return_hidden else None)
    state = (jnp.int32(1), tokens, done, lengths, cache, rng, hidden)
    step, tokens, _, lengths, cache, _, hidden = jax.lax.while_loop(cond, body, state)
    if not return_hidden:
        return GenerateOutput(tokens, lengths)
    _, _, hidden = feed(step, tokens, cache, hidden)
    return GenerateOutput(tokens, lengths,
                          jnp.concatenate([prompt_hidden[0].astype(jnp.float32), hidden], axis=1))


_JITTED: dict = {}


def generate_fn(model: Decoder, max_new_tokens: int, sampling: Sampling = Sampling(),
                stop_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                small_batch_kernel: bool = False, return_hidden: bool = False,
                attention_kernel: bool = False, first_token_hook=None):
    """The jitted `(params, input_ids, attention_mask, extra_embeddings, extra_positions, rng,
    hook_params=None) -> GenerateOutput` for these static settings (cached), for callers that
    manage shardings. `first_token_hook`: see `generate`'s `first_token` (its params are
    `hook_params`).
    `small_batch_kernel`: decode steps use `kernels.small_batch_matmul` (see `generate`).
    `return_hidden`: the output also holds the final hidden states (see `GenerateOutput`).
    `attention_kernel`: decode steps attend with `kernels.decode_attention` (see `generate`)."""
    key = (model.config, int(max_new_tokens), sampling, tuple(int(t) for t in stop_token_ids),
           int(pad_token_id), bool(small_batch_kernel), bool(return_hidden), bool(attention_kernel),
           first_token_hook)
    if key not in _JITTED:
        def fn(params, input_ids, attention_mask, extra_embeddings, extra_positions, rng,
               hook_params=None):
            return _generate_impl(model, key[1], sampling, key[3], key[4], key[5], key[6], key[7],
                                  key[8], params, input_ids, attention_mask, extra_embeddings,
                                  extra_positions, rng, hook_params)
        _JITTED[key] = jax.jit(fn)
    return _JITTED[key]


def decode_kernels(model: Decoder, params: Any, input_ids: jax.Array,
                   small_batch_kernel: bool | None = None, attention_kernel: bool | None = None
                   ) -> tuple[bool, bool]:
    """(small_batch_kernel, attention_kernel) for decoding `input_ids` [B, T] with `model`: each
    None resolved as `generate` documents (eligible here and calibrated faster than XLA), each
    True checked to load (RuntimeError otherwise)."""
    cfg = model.config
    for asked, kernel in ((small_batch_kernel, small_batch_matmul), (attention_kernel,
                                                                     decode_attention)):
        if asked and not kernel.load():     # asked for by name: it must be there
            raise RuntimeError(f"generate: {kernel.__name__} was asked for but cannot be built here "
                               "(no C++ compiler, or its UNIECG_* variable is 0)")
    rows = input_ids.shape[0]
    if attention_kernel is None:
        attention_kernel = decode_attention.usable(
            cfg.compute_dtype, rows, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads,
            cfg.resolved_head_dim, params)
    if small_batch_kernel is None:
        # One row: only beside the attention kernel. Beside XLA's attention the matmul kernel ran a
        # batch-1 decode up to 1.7x slower than XLA alone (small preset, 2-core Xeon, bench/llm.py),
        # beside the attention kernel 1.06-1.34x faster than the attention kernel alone.
        small_batch_kernel = (rows > 1 or attention_kernel) and small_batch_matmul.usable(
            cfg.compute_dtype, cfg.params_dtype, rows, params,
            shapes=lambda: small_batch_matmul.dense_matmul_shapes(model, params, input_ids[:, -1:]))
    return bool(small_batch_kernel), bool(attention_kernel)


def generate(model: Decoder, params: Any, input_ids, attention_mask=None, *,
             max_new_tokens: int = 32, stop_token_ids: Sequence[int] | None = None,
             sampling: Sampling = Sampling(), rng: jax.Array | None = None,
             extra_embeddings=None, extra_positions=None,
             pad_token_id: int | None = None,
             small_batch_kernel: bool | None = None, return_hidden: bool = False,
             attention_kernel: bool | None = None, first_token=None) -> GenerateOutput:
    """Generates up to `max_new_tokens` per row for LEFT-padded prompts.

    Args:
      input_ids / attention_mask: [B, T] (mask 1 = real token); see `left_pad`.
      stop_token_ids: a row stops after emitting any of these (default: the config's eos).
      sampling: greedy by default.
      extra_embeddings [B, N, D] / extra_positions [B, N]: spliced into the prompt at prefill.
      small_batch_kernel: decode steps run the model's matmuls through
        `kernels.small_batch_matmul` (1..8 rows in f32 on CPU). None (default): wherever
        `small_batch_matmul.usable` says it applies and was measured faster than XLA's dot on this
        CPU for this model's shapes (a ~1 s calibration at first use, then cached); False: never.
      attention_kernel: decode steps attend over the KV cache with `kernels.decode_attention`
        (f32 on CPU). None (default): where `decode_attention.usable` says it applies and was
        measured faster than XLA's attention on this CPU for these shapes (cached); False: never.
      return_hidden: also return the final hidden states of prompt and generated tokens
        ([B, T + max_new_tokens, D]; one extra decode step feeds the last token).
      first_token: optional (hook, hook_params): the first token is drawn from
        `hook(hook_params, prompt_hidden [B, T, D], input_ids, attention_mask, logits [B, V]) ->
        [B, V]` instead of the prefill's last logits (one jit per hook: keep it a cached
        function).
    Returns: GenerateOutput(tokens [B, max_new_tokens], lengths [B], hidden or None).
    """
    cfg = model.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    mask_host = np.asarray(attention_mask)
    if (np.diff(mask_host, axis=1) < 0).any():
        raise ValueError("generate: prompts must be left-padded (attention_mask must be "
                         "non-decreasing along each row); use decoding.left_pad")
    stop = tuple(stop_token_ids) if stop_token_ids is not None else (cfg.eos_token_id,)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if not sampling.greedy and rng is None:
        raise ValueError("generate: sampling needs an rng key")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    small_batch_kernel, attention_kernel = decode_kernels(model, params, input_ids,
                                                          small_batch_kernel, attention_kernel)
    hook, hook_params = first_token if first_token is not None else (None, None)
    fn = generate_fn(model, max_new_tokens, sampling, stop, pad, small_batch_kernel, return_hidden,
                     attention_kernel, hook)
    extra_positions = None if extra_positions is None else jnp.asarray(extra_positions, jnp.int32)
    return fn(params, input_ids, jnp.asarray(attention_mask, jnp.int32), extra_embeddings,
              extra_positions, rng, hook_params)
