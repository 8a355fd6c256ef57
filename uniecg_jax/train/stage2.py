"""Stage 2, Text-to-ECG by latent alignment: the `stage2` objective of the shared train loop.

Each example is a conversation drawn for a record (`data.pipelines.stage2_loader`): a generation
request in one of many phrasings (report-, question- or teaching-style, some attributes stated,
sometimes after a turn about the report) answered by `[ECG0]..[ECG{N-1}]</s>`, or, with
`data.negative_fraction`, a question answered in words. Loss = `token_loss_weight` x next-token CE
on every answer token + `decision_weight` x the binary CE of answering with `[ECG0]` at the first
token of the last answer (`decision_loss`: high after generation requests, low after questions
answered in words; with `model.decision` that probability is the decision read-out's, which reads
the whole request) + on generation rows only: `mse_weight` x MSE + `cosine_weight` x (1 - cosine)
between the alignment head's output (on the hidden states at the `[ECG]` positions) and the frozen
text encoder's embedding of the report, and, with `model.attributes`, `heart_rate_weight` /
`age_weight` x the squared error of the standardised heart rate / age and `sex_weight` x the sex
cross-entropy against the record's own values (where known) + `preservation_weight` x the stage-1
CE on interpretation answers (ECG conversations): with all old weights frozen its gradient reaches
only the new rows and keeps the `[ECG]` logits below the answer tokens when an ECG is interpreted.

Only the new rows and the alignment / attribute / decision heads learn: `train.freeze` freezes every other tensor, and
`only_rows_train` stops the gradient of the old rows of `llm/embedding` / `llm/lm_head` inside the
loss, so their gradients, Adam moments and updates are exact zeros (with weight_decay 0, enforced).
The model starts from a stage-1 checkpoint (`init.stage1_ckpt`: vocabulary extended with
mean-initialised rows, alignment head random) or, without one, random (tests).
"""
from __future__ import annotations

import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from uniecg_jax.checkpoint import load_model_config, restore_model, stored_shapes, tokenizer_path
from uniecg_jax.config import ConfigError, replace_values
from uniecg_jax.data.bundled import bundled_split
from uniecg_jax.errors import UniECGError
from uniecg_jax.layers.params import abstract_params, count_params, path_name
from uniecg_jax.convert.hf_llm import add_tokens
from uniecg_jax.data.chat_format import ecg_token_names
from uniecg_jax.data.examples import decode_example
from uniecg_jax.data.measure import with_measured_rhythms
from uniecg_jax.data.pipelines import records_source, stage1_loader, stage2_loader
from uniecg_jax.data.tokenizer import add_ecg_tokens, load_tokenizer, numeral_pieces
from uniecg_jax.models.stage2 import (STAGE1_KEYS, UniECGStage2, build_stage2, init_stage2_params,
                                      stage1_model, stage1_params)
from uniecg_jax.train.lm import llm_flops_per_token, next_token_loss
from uniecg_jax.inference.interpret import model_exporter, resolve_model_dir
from uniecg_jax.train.loop import TrainTask
from uniecg_jax.train.schema import load_train_config
from uniecg_jax.train.stage1 import stage1_data_source, stage1_loss

# Batch fields of the interpretation (stage-1) examples that keep the [ECG] rows out of answers.
INTERPRET_PREFIX = "interpret/"


def stage1_model_dir(config: ml_collections.ConfigDict) -> str | None:
    """The stage-1 model checkpoint directory of `init.stage1_ckpt` (workdir or model dir)."""
    if not config.init.stage1_ckpt:
        return None
    return resolve_model_dir(str(config.init.stage1_ckpt))


def _load_base_tokenizer(config: ml_collections.ConfigDict, stage1_dir: str | None,
                         placeholder: str = "token"):
    """The stage-1 checkpoint's tokenizer, else data.tokenizer, else the tiny one (no [ECG] yet);
    `<ecg>` is added only for a "token" placeholder (a GEM-derived stage 1 splices at a sentinel)."""
    path = (tokenizer_path(stage1_dir) if stage1_dir else None) or config.data.tokenizer or None
    return load_tokenizer(path, placeholder=placeholder), path


def finalize_stage2_config(config: ml_collections.ConfigDict):
    """The stage-2 config (a new one; `config` is left as it is) and the tokenizer with the `[ECG]`
    tokens: returns (config, tokenizer, tokenizer path, stage-1 dir, vocabulary size before).

    With a stage-1 checkpoint its llm / ecg_encoder / projector shapes replace the config's. The N
    `[ECG]` tokens are added to the tokenizer (as `convert.hf_llm.add_tokens` does), their ids go to
    `model.ecg_token_ids` and `model.llm.vocab_size` grows to cover them.
    """
    stage1_dir = stage1_model_dir(config)
    count = int(config.model.num_ecg_tokens)
    if count < 1:
        raise ConfigError(f"model.num_ecg_tokens must be >= 1, got {count}")
    # The stage-1 model's input layout (`model.input`: prompt format, placeholder, lead order)
    # comes along with its shapes, so a GEM-derived stage 1 keeps GEM's prompt in stage 2.
    names = ("llm", "ecg_encoder", "projector") + (("input",) if "input" in config.model else ())
    groups = {group: config.model[group].to_dict() for group in names}
    if stage1_dir:
        stage1 = load_model_config(stage1_dir)
        groups = {group: stage1.model[group].to_dict() for group in groups
                  if group in stage1.model}
    placeholder = groups.get("input", {}).get("placeholder", "token")
    tokenizer, path = _load_base_tokenizer(config, stage1_dir, placeholder)
    llm = groups["llm"]
    old_vocab = int(llm["vocab_size"])
    if len(tokenizer) > old_vocab:
        raise ConfigError(f"tokenizer {path or 'tiny'} has {len(tokenizer)} tokens but "
                          f"model.llm.vocab_size is {old_vocab}")
    ids = add_ecg_tokens(tokenizer, count)
    llm.update(vocab_size=max(old_vocab, len(tokenizer), max(ids) + 1),
               pad_token_id=int(tokenizer.pad_token_id), eos_token_id=int(tokenizer.eos_token_id))
    if float(config.train.weight_decay) != 0.0:
        raise ConfigError(f"train.weight_decay={config.train.weight_decay}: must be 0 in stage 2 "
                          "(decoupled weight decay would move the frozen vocabulary rows)")
    changes = {f"model.{group}": values for group, values in groups.items()}
    if config.model.get("attributes") is not None and config.model.attributes.get("read_numbers"):
        # The head reads numbers through this tokenizer's digit tokens.
        changes["model.attributes.numerals"] = [list(p) for p in numeral_pieces(tokenizer)]
    config = replace_values(config, {"model.ecg_token_ids": ids, **changes})
    return config, tokenizer, path, stage1_dir, old_vocab


def only_rows_train(table: jax.Array, trainable_rows: jax.Array, axis: int) -> jax.Array:
    """`table` unchanged in value, but the gradient reaches only `trainable_rows` ([V] bool) along
    `axis` (0 for embedding [V, D], 1 for lm_head [D, V]); the other rows get exact zeros."""
    shape = [1] * table.ndim
    shape[axis] = -1
    keep = trainable_rows.reshape(shape)
    return jnp.where(keep, table, jax.lax.stop_gradient(table))


def new_row_mask(vocab_size: int, token_ids) -> np.ndarray:
    """[V] bool, True at the `[ECG]` token rows."""
    mask = np.zeros((vocab_size,), bool)
    mask[np.asarray(token_ids)] = True
    return mask


def with_row_gradient_mask(params: Any, trainable_rows: jax.Array) -> Any:
    """params with `only_rows_train` applied to `llm/embedding` and an untied `llm/lm_head`."""
    llm = dict(params["llm"])
    llm["embedding"] = only_rows_train(llm["embedding"], trainable_rows, 0)
    if "lm_head" in llm:
        llm["lm_head"] = {"kernel": only_rows_train(llm["lm_head"]["kernel"], trainable_rows, 1)}
    return {**params, "llm": llm}


def _row_mean(values: jax.Array, rows: jax.Array) -> jax.Array:
    """values [B] -> their mean over rows where `rows` [B] is 1 (0 when there is none)."""
    rows = rows.astype(jnp.float32)
    return jnp.sum(values * rows) / jnp.maximum(rows.sum(), 1.0)


def alignment_losses(predicted: jax.Array, target: jax.Array, rows: jax.Array | None = None
                     ) -> dict:
    """predicted / target [B, D] -> {"mse": mean squared error, "cosine": mean cosine similarity},
    averaged over the rows where `rows` [B] is 1 (default: all)."""
    predicted, target = predicted.astype(jnp.float32), target.astype(jnp.float32)
    rows = jnp.ones(predicted.shape[:1]) if rows is None else rows
    # A row without [ECG] tokens pools to zeros, whose norm has a NaN gradient (NaN x 0 weight is
    # still NaN): give such rows a stand-in vector; they carry no weight in the means.
    predicted = jnp.where(rows[:, None] > 0, predicted, jnp.ones_like(predicted))
    mse = _row_mean(jnp.mean(jnp.square(predicted - target), -1), rows)
    cosine = jnp.sum(predicted * target, -1) / (
        jnp.linalg.norm(predicted, axis=-1) * jnp.linalg.norm(target, axis=-1) + 1e-8)
    return {"mse": mse, "cosine": _row_mean(cosine, rows)}


def attribute_losses(predicted: dict, batch: dict, rows: jax.Array, config) -> dict:
    """The attribute head's outputs (`AttributeHead`: heart_rate / age [B], male_logit [B]) against
    the batch's heart_rate / age / sex [B] where `attribute_known` [B, 3] and `rows` [B] are 1:
    squared error of the standardised values, sex cross-entropy; plus MAE (bpm, years) and sex
    accuracy for the log."""
    known = batch["attribute_known"].astype(jnp.float32) * rows.astype(jnp.float32)[:, None]
    rate_error = (predicted["heart_rate"] - batch["heart_rate"]) / config.heart_rate_scale
    age_error = (predicted["age"] - batch["age"]) / config.age_scale
    logit, male = predicted["male_logit"], batch["sex"].astype(jnp.float32)
    sex_ce = jnp.maximum(logit, 0) - logit * male + jnp.log1p(jnp.exp(-jnp.abs(logit)))
    return {"heart_rate_loss": _row_mean(jnp.square(rate_error), known[:, 0]),
            "age_loss": _row_mean(jnp.square(age_error), known[:, 1]),
            "sex_loss": _row_mean(sex_ce, known[:, 2]),
            "heart_rate_mae": _row_mean(jnp.abs(rate_error) * config.heart_rate_scale, known[:, 0]),
            "age_mae": _row_mean(jnp.abs(age_error) * config.age_scale, known[:, 1]),
            "sex_accuracy": _row_mean(((logit > 0) == (male > 0.5)).astype(jnp.float32),
                                      known[:, 2])}


def decision_positions(target_mask: jax.Array) -> jax.Array:
    """target_mask [B, T] (1 where position t's next token is an answer token) -> [B] int32: the
    position that predicts the first token of each row's last answer (-1 for a row without one)."""
    mask = target_mask.astype(jnp.int32)
    starts = mask * (1 - jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1])
    index = jnp.arange(mask.shape[1])
    return jnp.max(jnp.where(starts > 0, index, -1), axis=1)


def decision_loss(logits: jax.Array, target_mask: jax.Array, generation: jax.Array,
                  first_ecg_id: int) -> tuple[jax.Array, jax.Array]:
    """Binary cross-entropy of the choice to answer with `[ECG0]`, at the position that predicts
    the first token of each row's last answer: p([ECG0]) should be high on generation rows and
    low on rows answered in words. The token CE alone spreads this one decision over every answer
    token (a word answer's first token is 1 of ~20), so it is learned far more slowly.

    logits [B, T, V]; target_mask [B, T] (1 where position t's next token is an answer token);
    generation [B] bool. Returns (BCE, accuracy of p > 0.5) over rows with an answer; the BCE
    is the mean of the two classes' means (each class present in the batch weighs the same): with
    a plain row mean the ~70% generation rows outweighed the word answers, and the demo model
    answered 68-93% of questions about a report with [ECG]. With a decision read-out
    (`model.decision`) the logits at that position are already its verdict
    (`UniECGStage2.decide_first_token`), so this BCE trains the read-out."""
    decision = decision_positions(target_mask)
    rows = decision >= 0
    row_logits = jnp.take_along_axis(logits, jnp.maximum(decision, 0)[:, None, None], axis=1)[:, 0]
    row_logits = row_logits.astype(jnp.float32)
    log_p = row_logits[:, first_ecg_id] - jax.nn.logsumexp(row_logits, axis=-1)
    log_not_p = jnp.log(-jnp.expm1(jnp.minimum(log_p, -1e-6)))
    bce = -jnp.where(generation, log_p, log_not_p)
    correct = ((log_p > jnp.log(0.5)) == generation).astype(jnp.float32)
    classes = [rows & generation, rows & ~generation]
    present = sum(jnp.any(c).astype(jnp.float32) for c in classes)
    balanced = sum(_row_mean(bce, c) for c in classes) / jnp.maximum(present, 1.0)
    return balanced, _row_mean(correct, rows)


def stage2_loss(model: UniECGStage2, params: Any, batch: dict, trainable_rows: jax.Array,
                weights: dict) -> tuple[jax.Array, dict]:
    """Weighted CE on every answer token ([ECG] tokens + eos, or words), on generation rows MSE
    and (1 - cosine) to the text embedding and the attribute losses, and (when `batch` has
    `interpret/*` fields) the stage-1 CE on interpretation answers. `weights`: the
    `Stage2TrainConfig` loss weights by name (`loss_weights`)."""
    preservation_weight = weights["preservation_weight"]
    params = with_row_gradient_mask(params, trainable_rows)
    metrics = {}
    preservation = 0.0
    if preservation_weight and any(k.startswith(INTERPRET_PREFIX) for k in batch):
        interpret = {k[len(INTERPRET_PREFIX):]: v for k, v in batch.items()
                     if k.startswith(INTERPRET_PREFIX)}
        preservation, aux = stage1_loss(stage1_model(model.config), stage1_params(params),
                                        interpret)
        metrics["interpret_nll"] = aux["nll"]
    pad = model.config.unified.llm.pad_token_id
    ids = batch["input_ids"]
    # Position t predicts token t + 1; the last position predicts nothing.
    targets = jnp.concatenate([ids[:, 1:], jnp.full_like(ids[:, :1], pad)], axis=1)
    target_mask = jnp.concatenate([batch["loss_mask"][:, 1:],
                                   jnp.zeros_like(batch["loss_mask"][:, :1])], axis=1)
    # With a decision read-out the logits at each row's decision position are its verdict (so
    # the token CE there and the decision BCE both train it, as it decides at inference).
    logits, condition, valid, attributes = model.apply(
        {"params": params}, ids, batch["attention_mask"], decision_positions(target_mask),
        method=UniECGStage2.generate_outputs)
    generation = valid.all(-1)    # rows answered by the [ECG] tokens (the others: in words)
    token_loss, aux = next_token_loss(logits, targets, target_mask)
    # Logged apart: the [ECG] answers (learnable) and the word answers (the frozen LLM's own
    # text, whose CE mostly cannot move; it is there to push the [ECG] logits down).
    _, ecg_aux = next_token_loss(logits, targets, target_mask * generation[:, None])
    _, words_aux = next_token_loss(logits, targets, target_mask * ~generation[:, None])
    aligned = alignment_losses(condition, batch["text_embedding"], generation)
    decision, decision_accuracy = decision_loss(logits, target_mask, generation,
                                                model.config.ecg_token_ids[0])
    metrics.update(decision_loss=decision, decision_accuracy=decision_accuracy)
    loss = (weights["token_loss_weight"] * token_loss + weights["decision_weight"] * decision
            + weights["mse_weight"] * aligned["mse"]
            + weights["cosine_weight"] * (1.0 - aligned["cosine"])
            + preservation_weight * preservation)
    if attributes is not None:
        read = attribute_losses(attributes, batch, generation, model.config.attributes)
        loss = loss + (weights["heart_rate_weight"] * read["heart_rate_loss"]
                       + weights["age_weight"] * read["age_loss"]
                       + weights["sex_weight"] * read["sex_loss"])
        metrics.update(read)
    return loss, {"num_tokens": aux["num_tokens"], "token_nll": ecg_aux["nll"],
                  "token_accuracy": ecg_aux["accuracy"], "words_nll": words_aux["nll"],
                  "generation_rows": generation.astype(jnp.float32).mean(), **aligned, **metrics}


LOSS_WEIGHTS = ("token_loss_weight", "decision_weight", "mse_weight", "cosine_weight", "preservation_weight",
                "heart_rate_weight", "age_weight", "sex_weight")


def loss_weights(train_config) -> dict:
    """{name: float} of the stage-2 loss weights of a `Stage2TrainConfig`."""
    return {name: float(getattr(train_config, name)) for name in LOSS_WEIGHTS}


class PairedIterator:
    """Generation-request batches merged with interpretation batches (fields `interpret/...`);
    `get_state`/`set_state` carry both grain positions, so the pair checkpoints as one item."""

    def __init__(self, requests, interpretations):
        self.requests, self.interpretations = requests, interpretations

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.requests))
        batch.update({INTERPRET_PREFIX + k: v for k, v in next(self.interpretations).items()})
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"requests": self.requests.get_state().decode(),
                           "interpretations": self.interpretations.get_state().decode()}).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state.decode() if isinstance(state, bytes) else state)
        self.requests.set_state(states["requests"].encode())
        self.interpretations.set_state(states["interpretations"].encode())

    def start_prefetch(self) -> None:
        for iterator in (self.requests, self.interpretations):
            if hasattr(iterator, "start_prefetch"):
                iterator.start_prefetch()


_EMBEDDED_SOURCES: dict = {}


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the bundled data draw (split, synthetic records): `data.seed`, or `seed` when
    that is -1 (or absent), so training seeds can vary over one data set."""
    seed = int(config.data.get("seed", -1))
    return int(config.seed) if seed < 0 else seed


def stage2_data_source(config: ml_collections.ConfigDict, split: str):
    """A prep folder path, or bundled + synthetic records with reports embedded by `text.encoder`
    and heart rates measured (once per process, cached)."""
    if config.data.source != "bundled":
        return config.data.source
    key = (str(config.text.encoder), int(config.data.holdout_every),
           int(config.data.num_synthetic), data_seed(config), split)
    if key not in _EMBEDDED_SOURCES:
        records = with_measured_rhythms(bundled_split(key[1], key[2], key[3])[split])
        _EMBEDDED_SOURCES[key] = records_source(records, text_encoder=key[0])
    return _EMBEDDED_SOURCES[key]


def build_task(config: ml_collections.ConfigDict) -> TrainTask:
    """The `stage2` TrainTask."""
    config, tokenizer, tokenizer_path, stage1_dir, old_vocab = finalize_stage2_config(config)
    train_config = load_train_config(config)
    model, s2cfg = build_stage2(config.model)
    max_length = int(config.data.max_length)
    count = s2cfg.num_ecg_tokens
    text_dim = s2cfg.alignment.output_dim
    if text_dim != int(config.text.embed_dim):
        raise ConfigError(f"model.alignment.output_dim={text_dim} must equal text.embed_dim="
                          f"{config.text.embed_dim} (the text encoder's width)")
    trainable_rows = new_row_mask(s2cfg.unified.llm.vocab_size, s2cfg.ecg_token_ids)
    weights = loss_weights(train_config)

    def init_params(rng):
        return init_stage2_params(model, rng, max_length)

    def loss_fn(params, batch, rng):
        del rng
        return stage2_loss(model, params, batch, jnp.asarray(trainable_rows), weights)

    def make_data(process_index, process_count, local_batch):
        source = stage2_data_source(config, "train")
        first = source[0] if not isinstance(source, str) else None
        if first is not None:
            width = np.asarray(decode_example(first)["text_embedding"]).shape[-1]
            if width != text_dim:
                raise UniECGError(f"text encoder {config.text.encoder!r} gives {width}-d "
                                  f"embeddings but text.embed_dim is {text_dim}")
        input_format = config.model.get("input", {})
        loader = stage2_loader(source, tokenizer, num_ecg_tokens=count, max_length=max_length,
                               input_format=input_format,
                               batch_size=local_batch, split="train", seed=int(config.seed),
                               negative_probability=float(config.data.negative_fraction),
                               follow_up_probability=float(config.data.follow_up_fraction),
                               state_probability=float(config.data.state_fraction),
                               process_index=process_index, process_count=process_count,
                               worker_count=int(config.data.worker_count))
        if not weights["preservation_weight"]:
            return iter(loader)

        interpretations = stage1_loader(
            stage1_data_source(replace_values(config, {"seed": data_seed(config)}), "train"),
            tokenizer, input_format=input_format,
            max_length=int(config.data.interpret_max_length), batch_size=local_batch,
            split="train", seed=int(config.seed) + 1, process_index=process_index,
            process_count=process_count, worker_count=int(config.data.worker_count))
        return PairedIterator(iter(loader), iter(interpretations))

    def abstract_batch(global_batch):
        tokens = jax.ShapeDtypeStruct((global_batch, max_length), jnp.int32)
        scalar = jax.ShapeDtypeStruct((global_batch,), jnp.float32)
        batch = {"input_ids": tokens, "loss_mask": tokens, "attention_mask": tokens,
                 "ecg_token_positions": jax.ShapeDtypeStruct((global_batch, count), jnp.int32),
                 "text_embedding": jax.ShapeDtypeStruct((global_batch, text_dim), jnp.float32),
                 "heart_rate": scalar, "age": scalar, "sex": scalar,
                 "attribute_known": jax.ShapeDtypeStruct((global_batch, 3), jnp.float32)}
        if weights["preservation_weight"]:
            enc = s2cfg.unified.encoder
            interpret = jax.ShapeDtypeStruct((global_batch, int(config.data.interpret_max_length)),
                                             jnp.int32)
            batch.update({INTERPRET_PREFIX + k: v for k, v in {
                "input_ids": interpret, "loss_mask": interpret, "attention_mask": interpret,
                "ecg": jax.ShapeDtypeStruct((global_batch, enc.num_leads, enc.num_samples),
                                            jnp.float32),
                "ecg_position": jax.ShapeDtypeStruct((global_batch,), jnp.int32)}.items()})
        return batch

    initial_params = None
    if stage1_dir:
        initial_params = functools.partial(_params_from_stage1, config, model, stage1_dir)

    llm_params = s2cfg.unified.llm.num_params()
    # Exact count of everything the model holds (tower, LLM, alignment head), from abstract shapes.
    num_params = count_params(abstract_params(init_params, jax.random.PRNGKey(0)))
    batch = int(config.train.batch_size)
    flops = batch * max_length * llm_flops_per_token(config.model.llm, max_length, llm_params)
    source = (f"bundled + {config.data.num_synthetic} synthetic reports (held-out patients "
              f"excluded), embedded by {config.text.encoder}" if config.data.source == "bundled"
              else config.data.source)
    task = TrainTask(
        name="stage2", init_params=init_params, loss_fn=loss_fn, make_data=make_data,
        abstract_batch=abstract_batch, flops_per_step=flops, tokens_per_step=batch * max_length,
        num_params=num_params,
        data_description=f"{source}; tokenizer {tokenizer_path or 'tiny (bundled)'} + {count} "
                         f"[ECG] tokens (ids {s2cfg.ecg_token_ids[0]}..{s2cfg.ecg_token_ids[-1]}); "
                         f"from {stage1_dir or 'random init'}",
        initial_params=initial_params, config=config, tokenizer=tokenizer,
        export=model_exporter(config, tokenizer))
    return task


def _stage1_targets(stage1_dir: str, abstract_params) -> dict:
    """Restore targets for a stage-1 checkpoint: every tensor straight onto its stage-2 sharding
    (so a 7B model never gathers on one device); the vocabulary-sized ones (fewer rows before the
    [ECG] tokens are added) keep that sharding except along the dimension that differs."""
    stored = stored_shapes(stage1_dir)

    def target(path, leaf):
        name = path_name(path)
        if name not in stored:
            return leaf  # restore_model names the missing tensor
        shape, dtype = stored[name]
        sharding = leaf.sharding
        if tuple(shape) != tuple(leaf.shape):
            spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
            spec = [None if a != b else axis for axis, a, b in zip(spec, shape, leaf.shape)]
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec))
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    stage1_part = {key: abstract_params[key] for key in STAGE1_KEYS}
    return jax.tree_util.tree_map_with_path(target, stage1_part)


def _params_from_stage1(config, model: UniECGStage2, stage1_dir: str, mesh, abstract_params):
    """Stage-1 tower + LLM (vocabulary extended, mean rows) + random alignment (and attribute)
    heads, sharded. Only the heads are randomly initialised (the jitted init returns just those
    subtrees, so XLA drops the random tower and LLM init the stage-1 weights replace)."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    heads = [key for key in abstract_params if key not in STAGE1_KEYS]
    fresh = jax.jit(lambda rng: {key: value for key, value in nn.meta.unbox(
        init_stage2_params(model, rng)).items() if key in heads},
        out_shardings={key: shardings[key] for key in heads})(
            jax.random.PRNGKey(int(config.seed)))
    stage1, stage1_config = restore_model(stage1_dir, _stage1_targets(stage1_dir, abstract_params))
    tokenizer, _ = _load_base_tokenizer(config, stage1_dir)
    llm, _, ids = add_tokens(stage1["llm"], stage1_config.model.llm, tokenizer,
                             ecg_token_names(int(config.model.num_ecg_tokens)))
    if list(ids) != list(model.config.ecg_token_ids):
        raise UniECGError(f"{stage1_dir}: [ECG] token ids {ids} differ from the config's "
                          f"{list(model.config.ecg_token_ids)}")
    vocab = model.config.unified.llm.vocab_size
    if llm["embedding"].shape[0] != vocab:
        raise UniECGError(f"{stage1_dir}: extended embedding has {llm['embedding'].shape[0]} rows, "
                          f"the stage-2 config {vocab}")
    params = dict(fresh)
    params["llm"] = jax.device_put(llm, shardings["llm"])
    params["ecg_tower"] = jax.device_put(stage1["ecg_tower"], shardings["ecg_tower"])
    return params

