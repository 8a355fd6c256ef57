"""The plain language-model objective: next-token cross-entropy with a loss mask.

Used by `uniecg train --config configs/llm.py:<variant>` and, through `next_token_loss`, by stage 1
(loss on assistant tokens only = a loss mask). The loss is computed in float32 whatever the compute
dtype; an optional z-loss (PaLM) keeps the softmax normaliser near 1 for bf16 stability.

Data for the `lm` objective: the bundled ECG report / diagnosis strings tokenised with the project's
tiny tokenizer when `uniecg_jax.data.tokenizer` provides one (`train.data="reports"` or "auto"),
otherwise a deterministic synthetic task (`train.data="synthetic"`): every sequence is an arithmetic
progression modulo the vocabulary with a random start and a stride in [1, 8), so the next token is
predictable from context and the loss falls within a few dozen steps.
"""
from __future__ import annotations

import functools
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uniecg_jax.data import tokenizer as tokenizer_lib
from uniecg_jax.models.llm import build_decoder
from uniecg_jax.train.loop import TrainTask
from uniecg_jax.train.schema import load_train_config

SYNTHETIC_EXAMPLES = 4096
_FIRST_SYNTHETIC_ID = 3  # keep pad/bos/eos ids out of the synthetic stream


def next_token_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                    z_loss: float = 0.0) -> tuple[jax.Array, dict]:
    """Masked mean cross-entropy.

    Args:
      logits: [B, T, V] (any float dtype; upcast to f32).
      targets: [B, T] int, the token each position must predict.
      loss_mask: [B, T], 1 where the loss counts.
      z_loss: weight of mean(log Z ** 2) over counted positions (0 = off).
    Returns:
      (loss, aux): loss = sum(mask * (nll + z_loss * logZ^2)) / max(sum(mask), 1); aux has
      `num_tokens` (the denominator, used by gradient accumulation), `nll` and `accuracy` (the
      target holds the top logit; a tie for the top counts as a hit).
    """
    logits = logits.astype(jnp.float32)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = log_normaliser - target_logits
    mask = loss_mask.astype(jnp.float32)
    num_tokens = mask.sum()
    denominator = jnp.maximum(num_tokens, 1.0)
    mean_nll = (nll * mask).sum() / denominator
    loss = mean_nll
    if z_loss:
        loss = loss + z_loss * (jnp.square(log_normaliser) * mask).sum() / denominator
    # `target >= max` rather than `argmax == target`: XLA:CPU lowers argmax to a variadic reduce
    # that cost ~8% of a 32k-vocabulary training step; a plain max reduction costs a fraction.
    correct = (target_logits >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return loss, {"num_tokens": num_tokens, "nll": mean_nll,
                  "accuracy": (correct * mask).sum() / denominator}


def llm_flops_per_token(model_config: Any, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N_matmul + 12 * L * H * Dh * T (PaLM,
    appendix B). N_matmul leaves out the input embedding table (a gather, no FLOPs) unless it is
    tied to the output projection."""
    hidden, vocab = int(model_config.hidden_size), int(model_config.vocab_size)
    head_dim = int(model_config.head_dim) or hidden // int(model_config.num_heads)
    matmul_params = num_params - (0 if model_config.tie_word_embeddings else vocab * hidden)
    attention = 12 * int(model_config.num_layers) * int(model_config.num_heads) * head_dim * seq_len
    return 6.0 * matmul_params + attention


def _synthetic_example(index: int, seq_len: int, vocab_size: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, index])
    span = vocab_size - _FIRST_SYNTHETIC_ID
    start, stride = int(rng.integers(span)), int(rng.integers(1, 8))
    tokens = (_FIRST_SYNTHETIC_ID + (start + stride * np.arange(seq_len + 1)) % span).astype(np.int32)
    return {"input_ids": tokens[:-1], "targets": tokens[1:],
            "loss_mask": np.ones((seq_len,), np.int32)}


def _report_token_stream(config: ml_collections.ConfigDict) -> tuple[np.ndarray, str] | None:
    """All bundled report / diagnosis texts tokenised into one stream, or None when the tiny
    tokenizer is unavailable or its vocabulary does not fit `model.vocab_size`."""
    return _cached_report_stream(int(config.model.vocab_size), int(config.model.eos_token_id))


@functools.lru_cache(maxsize=4)
def _cached_report_stream(vocab_size: int, eos_id: int) -> tuple[np.ndarray, str] | None:
    try:
        tokenizer = tokenizer_lib.load_tiny()
        texts = tokenizer_lib.training_corpus()
    except (ImportError, OSError, AttributeError):
        return None
    if len(tokenizer) > vocab_size:
        return None
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(eos_id)
    return (np.asarray(ids, np.int32),
            f"bundled ECG reports/diagnoses, {len(texts)} texts = {len(ids)} tokens (tiny BPE)")


def lm_dataset(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1,
               local_batch: int | None = None) -> tuple[grain.IterDataset, str]:
    """The LM training stream for this host: batches {input_ids, targets, loss_mask} [b, T].

    Shuffled with `config.seed`, repeated forever, host `process_index` taking every
    `process_count`-th example, so hosts never see the same rows.
    """
    seq_len = int(config.train.seq_len)
    choice = str(config.train.data)
    stream = None if choice == "synthetic" else _report_token_stream(config)
    if choice == "reports" and stream is None:
        raise ValueError("train.data='reports' needs uniecg_jax.data.tokenizer.load_tiny_tokenizer "
                         "and a vocab no larger than model.vocab_size")
    seed = int(config.seed)
    if stream is not None:
        tokens, description = stream
        windows = (len(tokens) - 1) // seq_len
        if windows < 1:
            raise ValueError(f"report corpus ({len(tokens)} tokens) is shorter than seq_len={seq_len}")

        def example(i):
            window = tokens[i * seq_len:(i + 1) * seq_len + 1]
            return {"input_ids": window[:-1], "targets": window[1:],
                    "loss_mask": np.ones((seq_len,), np.int32)}
        dataset = grain.MapDataset.range(windows)
    else:
        vocab = int(config.model.vocab_size)
        description = (f"synthetic arithmetic-progression tokens ({SYNTHETIC_EXAMPLES} sequences of "
                       f"{seq_len}, vocab {vocab}); no tokenizer/report corpus used")

        def example(i):
            return _synthetic_example(int(i), seq_len, vocab, seed)
        dataset = grain.MapDataset.range(SYNTHETIC_EXAMPLES)
    dataset = dataset.shuffle(seed=seed).repeat(None)[process_index::process_count].map(example)
    batch = int(local_batch or config.train.batch_size)
    return dataset.batch(batch, drop_remainder=True).to_iter_dataset(), description


def build_task(config: ml_collections.ConfigDict) -> TrainTask:
    """The `lm` objective for `configs/llm.py`: the Decoder LLM on `lm_dataset`."""
    model, llm_config = build_decoder(config.model)
    train_config = load_train_config(config)
    seq_len = train_config.seq_len
    z_loss = train_config.z_loss

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

    def loss_fn(params, batch, rng):
        del rng  # no dropout in the decoder
        logits = model.apply({"params": params}, batch["input_ids"])
        return next_token_loss(logits, batch["targets"], batch["loss_mask"], z_loss)

    def make_data(process_index, process_count, local_batch):
        return iter(lm_dataset(config, process_index, process_count, local_batch)[0])

    def abstract_batch(global_batch):
        spec = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32)
        return {"input_ids": spec, "targets": spec, "loss_mask": spec}

    num_params = llm_config.num_params()
    tokens = int(config.train.batch_size) * seq_len
    return TrainTask(
        name="lm", init_params=init_params, loss_fn=loss_fn, make_data=make_data,
        abstract_batch=abstract_batch,
        flops_per_step=llm_flops_per_token(config.model, seq_len, num_params) * tokens,
        tokens_per_step=tokens, num_params=num_params,
        data_description=lambda: _describe_data(config), config=config)


def _describe_data(config: ml_collections.ConfigDict) -> str:
    choice = str(config.train.data)
    stream = None if choice == "synthetic" else _report_token_stream(config)
    if stream is not None:
        return stream[1]
    if choice == "synthetic":
        return f"synthetic arithmetic-progression tokens (vocab {int(config.model.vocab_size)})"
    return (f"synthetic arithmetic-progression tokens (vocab {int(config.model.vocab_size)}); "
            "no tiny tokenizer fitting model.vocab_size, so not the report corpus")
