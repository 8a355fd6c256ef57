"""The `vision` objective: pretrain an image tower on printed ECG pages before stage 1 freezes it.

GEM's image tower is a pretrained CLIP that stage 1 keeps frozen. No pretrained tower exists at the
demo's size (a 56 px ViT), and one trained from scratch under the stage-1 LLM loss collapses to a
constant (issue 16: across-page feature spread 9% at init, 0.07% after 1800 steps), so the model
answers every page alike. This objective gives the tiny tower what CLIP gives GEM's: features that
already tell pages apart. The tower reads each training record's rendered page (the same
renderer, distortions and seeds as stage 1, `data.multimodal`); a linear head on its selected
feature tokens (what the projector will see, token by token) predicts the record's diagnosis
statements (BCE over the interpretation metrics' statement vocabulary) and its heart rate (squared
error, standardised), the two things a stage-1 answer is scored on. Only the training split is read.

    uniecg train --config configs/vision.py:demo --workdir /tmp/tower    # -> /tmp/tower/clip_vision
    uniecg train --config configs/stage1.py:demo_image --workdir /tmp/s1 \\
        --config.init.clip_dir=/tmp/tower/clip_vision --config.model.vision_tower.frozen=True \\
        --config.train.freeze=^vision_tower/

The export is an HF `CLIPVisionModel` directory (`convert.hf_clip`), so stage 1 loads it by
`init.clip_dir` exactly as it loads openai/clip-vit-large-patch14-336; the head is dropped.
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uniecg_jax.convert import hf_clip
from uniecg_jax.data.examples import example_to_record
from uniecg_jax.data.bundled import bundled_split
from uniecg_jax.data.ecg_image import PrintDistortions
from uniecg_jax.data.multimodal import ecg_pixels, example_seed, with_rendered_images
from uniecg_jax.data.pipelines import MappedBatches, example_record_key, make_loader, \
    open_source
from uniecg_jax.data.record import to_encoder_lead_order
from uniecg_jax.errors import ConfigError
from uniecg_jax.eval import report_metrics
from uniecg_jax.eval.interpret_eval import reference_for
from uniecg_jax.layers.linear import DenseGeneral
from uniecg_jax.layers.params import abstract_params, count_params
from uniecg_jax.models.alignment import AttributeConfig
from uniecg_jax.models.clip_vision import ClipVisionConfig, ClipVisionTower, forward_flops
from uniecg_jax.train.loop import TrainTask
from uniecg_jax.train.schema import load_train_config
from uniecg_jax.train.stage1 import stage1_data_source

# Heart rate enters the loss standardised as the stage-2 attribute head's: (bpm - centre) / scale.
HEART_RATE_MEAN = AttributeConfig.heart_rate_center
HEART_RATE_SCALE = AttributeConfig.heart_rate_scale


def statement_names() -> tuple[str, ...]:
    """The head's statement outputs, in order: every statement of the vocabulary that scores
    stage-1 answers (`eval.report_metrics.StatementVocabulary.default`)."""
    return tuple(sorted(report_metrics.StatementVocabulary.default().statements))


def page_targets(record, statements: tuple[str, ...]) -> dict:
    """The record's targets as the interpretation metrics read them (`eval.interpret_eval.
    reference_for`): `statements` [S] multi-hot float32 (all zero and `statements_known` 0 when the
    record has no label in the vocabulary), `heart_rate` standardised and `heart_rate_known`."""
    reference = reference_for(record)
    vocab = report_metrics.StatementVocabulary.default()
    present = (report_metrics.reference_statements(reference, vocab)
               if reference.labels is not None else frozenset())
    rate = (reference.measurements or {}).get("heart_rate")
    return {"statements": np.asarray([name in present for name in statements], np.float32),
            "statements_known": np.float32(bool(present)),
            "heart_rate": np.float32(0.0 if rate is None
                                     else (rate - HEART_RATE_MEAN) / HEART_RATE_SCALE),
            "heart_rate_known": np.float32(rate is not None)}


class PageExample(grain.MapTransform):
    """Example -> ECG [12, 5000] (the tower's renderer reads it, in `lead_order`) + `page_targets`
    + `record_key` (seeds the page's print distortions, as in stage 1)."""

    def __init__(self, statements: tuple[str, ...], lead_order: str = "canonical"):
        self.statements, self.lead_order = statements, lead_order
        # A real record's rate is measured by QRS detection (~0.5 s): once per record, not per
        # epoch (each process of the loader keeps its own).
        self._targets: dict[str, dict] = {}

    def map(self, example: dict) -> dict:
        record = example_to_record(example)
        if record.record_id not in self._targets:
            self._targets[record.record_id] = page_targets(record, self.statements)
        return dict(ecg=to_encoder_lead_order(record.to_encoder_input(), self.lead_order),
                    record_key=example_record_key(example), **self._targets[record.record_id])


class PageBatches(MappedBatches):
    """Rendered-page batches with only what the step reads (`image` and the targets): the signal
    the page was drawn from stays on the host."""
    KEYS = ("image", "statements", "statements_known", "heart_rate", "heart_rate_known")

    def transform(self, batch: dict) -> dict:
        return {key: batch[key] for key in self.KEYS}


class TowerWithHead(nn.Module):
    """pixels [B, S, S, 3] -> (statement logits [B, num_statements], heart rate [B]): the tower's
    selected features [B, N, D] through one linear map over all N x D (a mean over the tokens
    loses where on the page a feature is: fit to 8 pages' rates, it stayed within 0.2 bpm of the
    mean after 150 steps, where this read-out fits them to ~1 bpm in 300). The tower is named
    `vision_tower` as inside the stage-1 model, so its subtree is the one stage 1 loads."""
    tower: ClipVisionConfig
    num_statements: int

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = ClipVisionTower(self.tower, name="vision_tower")(pixels)
        out = DenseGeneral(self.num_statements + 1, (None, "embed", None), axis=(-2, -1),
                           use_bias=True, name="head")(features.astype(jnp.float32))
        return out[:, :-1], out[:, -1]


def page_loss(model: TowerWithHead, params, batch, statement_weight: float = 1.0,
              heart_rate_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """Statement BCE (summed over statements, mean over labelled pages) + squared error of the
    standardised heart rate (mean over pages with a rate); aux holds the rate error in bpm."""
    logits, rate = model.apply({"params": params}, batch["image"])
    bce = jnp.sum(jnp.logaddexp(0.0, logits) - logits * batch["statements"], axis=-1)
    labelled = batch["statements_known"]
    statement_loss = jnp.sum(bce * labelled) / jnp.maximum(labelled.sum(), 1.0)
    known = batch["heart_rate_known"]
    error = (rate - batch["heart_rate"]) * known
    rate_loss = jnp.sum(error ** 2) / jnp.maximum(known.sum(), 1.0)
    loss = statement_weight * statement_loss + heart_rate_weight * rate_loss
    return loss, {"statement_bce": statement_loss,
                  "heart_rate_mae_bpm": jnp.sum(jnp.abs(error)) / jnp.maximum(known.sum(), 1.0)
                  * HEART_RATE_SCALE}


def tower_config(config: ml_collections.ConfigDict) -> ClipVisionConfig:
    """`model.vision_tower`, trainable here whatever its `frozen` says (stage 1 freezes it)."""
    return dataclasses.replace(ClipVisionConfig.from_config(config.model.vision_tower),
                               frozen=False)


def build_task(config: ml_collections.ConfigDict) -> TrainTask:
    """The `vision` TrainTask: `model.vision_tower` + a linear head on the training pages."""
    train_config = load_train_config(config)
    tower = tower_config(config)
    statements = statement_names()
    model = TowerWithHead(tower, len(statements))
    image_shape = (tower.image_size, tower.image_size, tower.num_channels)
    lead_order = config.data.get("ecg_lead_order", "canonical")

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]

    def loss_fn(params, batch, rng):
        del rng
        return page_loss(model, params, batch, train_config.statement_weight,
                         train_config.heart_rate_weight)

    def make_data(process_index, process_count, local_batch):
        loader = make_loader(open_source(stage1_data_source(config, "train", conversations=None)),
                             [PageExample(statements, lead_order)], batch_size=local_batch,
                             seed=int(config.seed), process_index=process_index,
                             process_count=process_count,
                             worker_count=int(config.data.worker_count))
        return PageBatches(with_rendered_images(
            iter(loader), tower.image_size, tower.image_aspect_ratio, lead_order,
            bool(config.data.image_distortions), int(config.seed)))

    def abstract_batch(global_batch):
        rows = jax.ShapeDtypeStruct((global_batch,), jnp.float32)
        return {"image": jax.ShapeDtypeStruct((global_batch, *image_shape), jnp.float32),
                "statements": jax.ShapeDtypeStruct((global_batch, len(statements)), jnp.float32),
                "statements_known": rows, "heart_rate": rows, "heart_rate_known": rows}

    def export(workdir, params):
        return hf_clip.save_clip_vision_hf(params["vision_tower"], tower,
                                           os.path.join(workdir, "clip_vision"))

    batch = int(config.train.batch_size)
    source = ("bundled records (held-out patients excluded) + "
              f"{config.data.num_synthetic} synthetic ECGs" if config.data.source == "bundled"
              else config.data.source)
    return TrainTask(
        name="vision", init_params=init_params, loss_fn=loss_fn, make_data=make_data,
        abstract_batch=abstract_batch, flops_per_step=3.0 * batch * forward_flops(tower),
        tokens_per_step=batch * tower.num_positions,
        num_params=count_params(abstract_params(init_params, jax.random.PRNGKey(0))),
        data_description=f"pages rendered from {source}; targets: {len(statements)} statements "
                         "+ heart rate",
        config=config, export=export)


def held_out_page_metrics(config: ml_collections.ConfigDict, params) -> dict:
    """How well the pretrained tower + head read pages it never saw: the held-out bundled records
    (`data.bundled.bundled_split`'s test split of `config`), their pages rendered as in training.
    Returns heart-rate MAE (bpm) against the best constant (the training mean rate), and the
    statement micro F1 of thresholded logits (0.5) against always predicting the most common
    training statement (the interpretation metrics' trivial baseline)."""
    if config.data.source != "bundled":
        raise ConfigError(f"data.source={config.data.source!r}: held-out page metrics read the "
                          "bundled records' held-out split only")
    tower = tower_config(config)
    statements = statement_names()
    model = TowerWithHead(tower, len(statements))
    lead_order = config.data.get("ecg_lead_order", "canonical")
    split = bundled_split(int(config.data.holdout_every), int(config.data.num_synthetic),
                          int(config.seed))
    distortions = PrintDistortions() if config.data.image_distortions else None

    # Each page as the training loader renders it (`data.multimodal.RenderedImages`'s seed).
    images = np.stack([ecg_pixels(
        to_encoder_lead_order(r.to_encoder_input(), lead_order), tower.image_size,
        tower.image_aspect_ratio, lead_order, distortions,
        example_seed(example_record_key({"record_id": r.record_id}), 0, int(config.seed)))
        for r in split["test"]])
    test_targets = [page_targets(r, statements) for r in split["test"]]
    test = {key: np.stack([t[key] for t in test_targets]) for key in test_targets[0]}
    train_targets = [page_targets(r, statements) for r in split["train"]]
    logits, rate = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    rate = np.asarray(rate) * HEART_RATE_SCALE + HEART_RATE_MEAN
    truth = test["heart_rate"] * HEART_RATE_SCALE + HEART_RATE_MEAN
    known = test["heart_rate_known"] > 0
    train_rates = [t["heart_rate"] * HEART_RATE_SCALE + HEART_RATE_MEAN for t in train_targets
                   if t["heart_rate_known"]]
    labelled = test["statements_known"] > 0
    counts = np.sum([t["statements"] for t in train_targets if t["statements_known"]], 0)
    common = np.arange(len(statements)) == np.argmax(counts)

    def micro_f1(predicted):
        predicted, actual = predicted[labelled], test["statements"][labelled] > 0
        tp = np.sum(predicted & actual)
        return float(2 * tp / max(predicted.sum() + actual.sum(), 1))

    return {"num_records": len(split["test"]),
            "heart_rate_mae": float(np.abs(rate - truth)[known].mean()),
            "heart_rate_mae_constant": float(np.abs(np.mean(train_rates) - truth)[known].mean()),
            "statement_micro_f1": micro_f1(np.asarray(logits) > 0),
            "statement_micro_f1_common": micro_f1(np.broadcast_to(common,
                                                                  test["statements"].shape))}
