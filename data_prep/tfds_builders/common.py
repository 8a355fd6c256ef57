"""What both TFDS builders share: features, configs (which text encoder embeds the report), the
patient split and the example dict built from an ECGRecord."""
from __future__ import annotations

import dataclasses
import inspect
import logging

import numpy as np
import tensorflow_datasets as tfds

from uniecg_jax.data.record import ENCODER_LENGTH, NUM_LEADS, ECGRecord
from uniecg_jax.data.splits import DEFAULT_FRACTIONS, patient_split
from uniecg_jax.data.text_encoder import get_text_encoder
from uniecg_jax.errors import RecordError

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ECGBuilderConfig(tfds.core.BuilderConfig):
    """text_encoder: name for `get_text_encoder` (None: no embedding); embedding_dim: its width."""

    text_encoder: str | None = None
    embedding_dim: int = 0


BUILDER_CONFIGS = [
    ECGBuilderConfig(name="plain", description="signals, metadata and reports; no embedding"),
    ECGBuilderConfig(name="minilm", description="plus the all-MiniLM-L6-v2 report embedding",
                     text_encoder="minilm", embedding_dim=384),
    ECGBuilderConfig(name="hash16", description="plus a 16-d hashing embedding (tests)",
                     text_encoder="hash:16", embedding_dim=16),
]


def features(config: ECGBuilderConfig) -> tfds.features.FeaturesDict:
    """signal [12, 5000] f32 mV @500 Hz; age/heart_rate -1 and sex -1 when unknown (M=1, F=0)."""
    spec = {
        "signal": tfds.features.Tensor(shape=(NUM_LEADS, ENCODER_LENGTH), dtype=np.float32),
        "lead_mask": tfds.features.Tensor(shape=(NUM_LEADS,), dtype=np.bool_),
        "record_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "age": np.float32,
        "sex": np.int32,
        "heart_rate": np.float32,
        "report": tfds.features.Text(),
        "labels": tfds.features.Sequence(tfds.features.Text()),
    }
    if config.embedding_dim:
        spec["text_embedding"] = tfds.features.Tensor(shape=(config.embedding_dim,),
                                                      dtype=np.float32)
    return tfds.features.FeaturesDict(spec)


def to_example(record: ECGRecord, embedding: np.ndarray | None) -> dict:
    example = {
        "signal": record.to_encoder_input(), "lead_mask": np.asarray(record.lead_mask, bool),
        "record_id": record.record_id, "patient_id": record.patient_id or "",
        "age": -1.0 if record.age is None else record.age,
        "sex": {"M": 1, "F": 0}.get(record.sex or "", -1),
        "heart_rate": -1.0 if record.heart_rate is None else record.heart_rate,
        "report": record.report, "labels": list(record.labels)}
    if embedding is not None:
        example["text_embedding"] = np.asarray(embedding, np.float32)
    return example


def generate(config: ECGBuilderConfig, keys_and_patients, read, split: str, batch: int = 256):
    """Yields (key, example) for the records of `split`; unreadable records are logged, skipped."""
    encoder = get_text_encoder(config.text_encoder) if config.text_encoder else None
    chosen = [(k, p) for k, p in keys_and_patients if patient_split(p, DEFAULT_FRACTIONS) == split]
    for start in range(0, len(chosen), batch):
        records = []
        for key, _ in chosen[start:start + batch]:
            try:
                records.append((key, read(key)))
            except RecordError as e:
                log.warning("skipping %s: %s", key, e)
        embeddings = encoder.encode([r.report for _, r in records]) if encoder else None
        for i, (key, record) in enumerate(records):
            yield str(key), to_example(record, None if embeddings is None else embeddings[i])


class ECGBuilderBase(tfds.core.GeneratorBasedBuilder):
    """Shared by the builders (abstract: tfds does not register it)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = BUILDER_CONFIGS

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds resolves a packaged builder's file through `importlib_resources`, which it declares
        # only for Python < 3.9 and so is absent here; the plain file path is all it needs.
        from etils import epath

        return epath.Path(inspect.getfile(cls))

    def _splits(self, keys_and_patients, read) -> dict:
        """Generators of the splits that have records (TFDS rejects an empty split)."""
        present = {patient_split(p, DEFAULT_FRACTIONS) for _, p in keys_and_patients}
        return {split: generate(self.builder_config, keys_and_patients, read, split)
                for split in ("train", "validation", "test") if split in present}
