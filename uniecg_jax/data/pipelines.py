"""grain pipelines feeding stage 1 (ECG -> text), stage 2 ([ECG] tokens + text embedding) and the
diffusion model, from data_prep's ArrayRecord shards or from in-memory records.

Every loader is a `grain.python.DataLoader`: per-host sharding with
`ShardOptions(process_index, process_count)` (parameters, default `jax.process_index/count()`),
deterministic shuffling by seed and epoch (`IndexSampler`), and an iterator whose
`get_state()/set_state()` checkpoint it exactly (Orbax can store it as its own item).
Host batches become global sharded `jax.Array`s with `global_batches(iterator, mesh)`.

    loader = stage1_loader("/data/grounding_shards", tokenizer, max_length=512, batch_size=8)
    for batch in global_batches(iter(loader), mesh): ...

Output fields (per host batch of B):
  stage 1:  ecg [B, 12, 5000] f32, input_ids / loss_mask / attention_mask [B, L] i32,
            ecg_position [B] i32 (index of the single `<ecg>` placeholder), record_key [B] i64
  stage 2:  input_ids / loss_mask / attention_mask [B, L] i32, ecg_token_positions [B, N] i32,
            text_embedding [B, D] f32, heart_rate / age / sex [B] f32, attribute_known [B, 3] f32,
            record_key [B] i64
  diffusion: signal [B, 12, 1024] f32, text_embedding [B, D] f32, sex / age / heart_rate [B] f32,
            condition_known [B, 3] f32 (1 where sex, age, heart rate are known), record_key [B] i64
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Iterator, Sequence

import grain.python as grain
import jax
import numpy as np

from uniecg_jax import sharding
from uniecg_jax.data.chat_format import InputBuilder
from uniecg_jax.data.conversations import build_conversation, record_attributes, stage2_fields, \
    stage2_request
from uniecg_jax.data.examples import decode_example, encode_example, example_to_record, \
    shard_paths
from uniecg_jax.data.measure import with_measured_rhythm
from uniecg_jax.data.record import DIFFUSION_FS, UNKNOWN_AGE, UNKNOWN_HEART_RATE, ECGRecord, \
    to_encoder_lead_order
from uniecg_jax.data.text_encoder import get_text_encoder
from uniecg_jax.data.tokenizer import add_ecg_tokens, load_tiny
from uniecg_jax.errors import UniECGError


class ExampleListSource:
    """Random-access source over encoded examples held in memory (bundled/synthetic data)."""

    def __init__(self, examples: Sequence[bytes]):
        self._examples = list(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> bytes:
        return self._examples[index]

    def __repr__(self) -> str:  # grain logs the source
        return f"ExampleListSource({len(self)} examples)"


def records_source(records: Sequence[ECGRecord], *, text_encoder=None,
                   conversations: Sequence[Any] | str | None = None) -> ExampleListSource:
    """In-memory source from ECGRecords; reports embedded with `text_encoder` (an object with
    `encode`, or a name for `get_text_encoder`) when given; `conversations[i]` ([(role, text)])
    attached to record i when given, or "build" = the grounded conversation of each record."""
    if isinstance(text_encoder, str):
        text_encoder = get_text_encoder(text_encoder)
    if isinstance(conversations, str):
        if conversations != "build":
            raise ValueError(f"conversations must be a list or 'build', got {conversations!r}")
        conversations = [build_conversation(r) for r in records]
    embeddings = text_encoder.encode([r.report for r in records]) if text_encoder else None
    return ExampleListSource([
        encode_example(r, None if embeddings is None else embeddings[i],
                       None if conversations is None else conversations[i])
        for i, r in enumerate(records)])


def open_source(data, split: str = "train"):
    """A data_prep output folder (-> ArrayRecordDataSource over the split's shards), a list of
    ECGRecords, or an existing random-access source (anything with __len__/__getitem__)."""
    if isinstance(data, (str, os.PathLike)):
        paths = shard_paths(data, split)
        if not paths:
            raise UniECGError(f"{data}: split {split!r} has no records")
        return grain.ArrayRecordDataSource(paths)
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], ECGRecord):
        return records_source(data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return data
    raise UniECGError(f"cannot read examples from {type(data).__name__}: pass a data_prep folder, "
                      "a list of ECGRecords or a random-access source")


def example_record_key(example: dict) -> np.int64:
    """The int64 key of an example (CRC of its record id): seeds per-example rendering."""
    return np.int64(zlib.crc32(example["record_id"].encode()))


class DecodeExample(grain.MapTransform):
    """bytes -> example dict (uniecg_jax.data.examples.decode_example)."""

    def map(self, data: bytes) -> dict:
        return decode_example(data)


class Stage1Example(grain.MapTransform):
    """Example -> ECG [12, 5000] + conversation tokens with one `<ecg>` placeholder, loss mask on
    assistant tokens only, padded/truncated to `max_length` (`InputBuilder.interpretation_example`).
    The ECG rows are in the encoder's `lead_order` (`data.record.to_encoder_lead_order`).
    """

    def __init__(self, inputs: InputBuilder, max_length: int, lead_order: str = "canonical"):
        self.inputs, self.max_length, self.lead_order = inputs, max_length, lead_order

    def map(self, example: dict) -> dict:
        record = example_to_record(example)
        turns = example.get("conversation")
        if not turns:  # no prepared conversation: build the grounded one (slow, QRS detection)
            turns = build_conversation(record)
        try:
            fields = self.inputs.interpretation_example(turns, self.max_length)
        except UniECGError as error:
            raise UniECGError(f"record {record.record_id}: {error}") from None
        return dict(ecg=to_encoder_lead_order(record.to_encoder_input(), self.lead_order),
                    **fields, record_key=example_record_key(example))


class Stage2Example(grain.RandomMapTransform):
    """Example -> one stage-2 conversation drawn for it (`data.conversations.stage2_request`): a
    generation request in a varied phrasing, stating some of the record's attributes, answered by
    `[ECG0]..[ECG{N-1}]</s>`; or (with `negative_probability`) a question answered in words.
    Plus the report's text embedding (computed in data_prep) and the attribute targets: the
    record's own heart rate / age / sex (`record_attributes`; heart rate measured by QRS detection
    when the source has none), `attribute_known` [3] = 1 where known on a generation row.
    Fields via `data.conversations.stage2_fields`; the tokenizer must already hold the `[ECG]`
    tokens (`data.tokenizer.add_ecg_tokens`): this transform never changes it."""

    def __init__(self, inputs: InputBuilder, num_ecg_tokens: int, max_length: int, *,
                 negative_probability: float = 0.0, follow_up_probability: float = 0.0,
                 state_probability: float = 0.5):
        self.inputs, self.max_length = inputs, max_length
        self.ecg_token_ids = inputs.ecg_token_ids(num_ecg_tokens)
        self.probabilities = dict(negative_probability=negative_probability,
                                  follow_up_probability=follow_up_probability,
                                  state_probability=state_probability)

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if example.get("text_embedding") is None:
            raise UniECGError(f"record {example['record_id']}: no text embedding; run data_prep "
                              "with a --text-encoder, or pass one to records_source")
        record = example_to_record(example)
        attributes = record_attributes(record)
        if attributes["heart_rate"] is None:
            attributes = record_attributes(with_measured_rhythm(record))
        request = stage2_request(record.report, attributes, rng, **self.probabilities)
        try:
            fields = stage2_fields(self.inputs, request, self.ecg_token_ids, self.max_length)
        except UniECGError as error:
            raise UniECGError(f"record {record.record_id}: {error}") from None
        generation = fields.pop("is_generation")
        known = np.array([attributes[name] is not None and generation
                          for name in ("heart_rate", "age", "sex")], np.float32)
        return dict(**fields, text_embedding=np.asarray(example["text_embedding"], np.float32),
                    heart_rate=np.float32(attributes["heart_rate"] or UNKNOWN_HEART_RATE),
                    age=np.float32(UNKNOWN_AGE if attributes["age"] is None else attributes["age"]),
                    sex=np.float32(attributes["sex"] == "M"), attribute_known=known,
                    record_key=example_record_key(example))


class DiffusionExample(grain.MapTransform):
    """Example -> signal [12, 1024] (10 s at 102.4 Hz) + text embedding + sex, age, heart rate.
    Heart rate: the source's, else data_prep's QRS measurement (`qrs_heart_rate`), else measured
    here by QRS detection on lead II. With `rhythm`, also `rhythm` [1024, 2]: beat-phase features
    (`diffusion.rhythm`) from the record's R peaks, detected here when data_prep stored none."""

    def __init__(self, rhythm: bool = False):
        self.rhythm = rhythm

    def map(self, example: dict) -> dict:
        if example.get("text_embedding") is None:
            raise UniECGError(f"record {example['record_id']}: no text embedding; run data_prep "
                              "with a --text-encoder, or pass one to records_source")
        record = example_to_record(example)
        heart_rate = record.heart_rate or record.measurements.get("qrs_heart_rate")
        if heart_rate is None or (self.rhythm and record.r_peaks is None):
            # Not measured in data_prep: one QRS detection now (slower) gives rate and peaks.
            record = with_measured_rhythm(record)
            heart_rate = heart_rate or record.heart_rate
        known = np.array([record.sex is not None, record.age is not None, heart_rate is not None],
                         np.float32)
        signal = record.to_diffusion_input()
        out = dict(signal=signal, text_embedding=np.asarray(example["text_embedding"], np.float32),
                   sex=np.float32(record.sex_code),
                   age=np.float32(UNKNOWN_AGE if record.age is None else record.age),
                   heart_rate=np.float32(UNKNOWN_HEART_RATE if heart_rate is None else heart_rate),
                   condition_known=known, record_key=example_record_key(example))
        if self.rhythm:
            # local: an upward import (data -> diffusion.rhythm -> models.unet for RHYTHM_CHANNELS);
            # rhythm_features belongs in data/, a move left to the layering work
            from uniecg_jax.diffusion.rhythm import rhythm_features

            out["rhythm"] = rhythm_features(record.r_peaks, signal.shape[1] / DIFFUSION_FS,
                                            signal.shape[1])
        return out


def make_loader(source, operations: Sequence[grain.Transformation], *, batch_size: int,
                seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                process_index: int | None = None, process_count: int | None = None,
                worker_count: int = 0, drop_remainder: bool = True) -> grain.DataLoader:
    """A DataLoader over this host's shard of `source`.

    batch_size: per-host batch (global batch = batch_size * process_count).
    process_index/count: this host's place (default jax.process_index()/process_count()); tests
      pass them to simulate several hosts. Each host sees a disjoint 1/process_count of the records.
    num_epochs: None = repeat forever; each epoch is reshuffled deterministically from `seed`.
    """
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                               drop_remainder=True)
    sampler = grain.IndexSampler(num_records=len(source), shard_options=shard, shuffle=shuffle,
                                 num_epochs=num_epochs, seed=seed)
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[DecodeExample(), *operations,
                                        grain.Batch(batch_size, drop_remainder=drop_remainder)],
                            worker_count=worker_count)


def stage1_loader(data, tokenizer=None, *, max_length: int = 256, batch_size: int = 8,
                  split: str = "train", system: str | None = None, input_format: Any = None,
                  **loader_kwargs) -> grain.DataLoader:
    """Stage-1 batches (ECG + conversation tokens). tokenizer: any HF tokenizer (with `<ecg>` for
    a "token" placeholder; default: the tiny one). input_format: the model's `model.input`
    (prompt format, placeholder, ECG lead order; default the project's own). loader_kwargs: see
    make_loader."""
    input_format = input_format or {}
    inputs = InputBuilder.for_model(tokenizer or load_tiny(), input_format, system)
    lead_order = (input_format.get("ecg_lead_order", "canonical") if hasattr(input_format, "get")
                  else input_format.ecg_lead_order)
    return make_loader(open_source(data, split), [Stage1Example(inputs, max_length, lead_order)],
                       batch_size=batch_size, **loader_kwargs)


def stage2_loader(data, tokenizer=None, *, num_ecg_tokens: int = 8, max_length: int = 128,
                  batch_size: int = 8, split: str = "train", negative_probability: float = 0.0,
                  follow_up_probability: float = 0.0, state_probability: float = 0.5,
                  input_format: Any = None, **loader_kwargs) -> grain.DataLoader:
    """Stage-2 batches (varied requests -> [ECG] tokens, + text embedding and attribute targets;
    questions answered in words with `negative_probability`; see `Stage2Example`). tokenizer: one
    that already holds the `[ECG]` tokens (`data.tokenizer.add_ecg_tokens`); default: the tiny one
    grown by `num_ecg_tokens` of them. input_format: the model's `model.input` (as stage1_loader)."""
    if tokenizer is None:
        tokenizer = load_tiny()
        add_ecg_tokens(tokenizer, num_ecg_tokens)
    return make_loader(open_source(data, split),
                       [Stage2Example(InputBuilder.for_model(tokenizer, input_format or {}),
                                      num_ecg_tokens, max_length,
                                      negative_probability=negative_probability,
                                      follow_up_probability=follow_up_probability,
                                      state_probability=state_probability)],
                       batch_size=batch_size, **loader_kwargs)


def diffusion_loader(data, *, batch_size: int = 8, split: str = "train", rhythm: bool = False,
                     **loader_kwargs) -> grain.DataLoader:
    """Diffusion batches (signal [12, 1024] + text embedding + sex, age, heart rate; with `rhythm`,
    beat-phase features [1024, 2] for rhythm-conditioned UNets)."""
    return make_loader(open_source(data, split), [DiffusionExample(rhythm)], batch_size=batch_size,
                       **loader_kwargs)


class MappedBatches:
    """An iterator of batches, each passed through `transform`, that checkpoints as the iterator it
    wraps: `get_state` / `set_state` / `start_prefetch` (which grain's checkpoint handler calls on
    restore) are the wrapped grain iterator's, so a resumed run sees the same batches."""

    def __init__(self, batches):
        self._batches = batches

    def transform(self, batch):
        return batch

    def __iter__(self) -> "MappedBatches":
        return self

    def __next__(self):
        return self.transform(next(self._batches))

    def get_state(self):
        return self._batches.get_state()

    def set_state(self, state) -> None:
        self._batches.set_state(state)

    def start_prefetch(self) -> None:
        if hasattr(self._batches, "start_prefetch"):
            self._batches.start_prefetch()


class GlobalBatchIterator(MappedBatches):
    """Wraps a grain iterator: yields global `jax.Array` batches sharded over (data, fsdp) and
    checkpoints like the grain iterator."""

    def __init__(self, host_iterator, mesh):
        super().__init__(host_iterator)
        self.mesh = mesh

    def transform(self, batch):
        # looked up on the module at each call, so a test can wrap it (tests/conftest.py)
        return sharding.global_batch_from_host(batch, self.mesh)


def global_batches(host_iterator, mesh) -> GlobalBatchIterator:
    """Host batches -> global arrays (`jax.make_array_from_process_local_data`, batch over the
    mesh's data and fsdp axes)."""
    return GlobalBatchIterator(host_iterator, mesh)
