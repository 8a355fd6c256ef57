"""Stage 1, ECG-to-Text: next-token loss on assistant tokens of grounded ECG conversations.

The `stage1` objective of the shared train loop (`configs/stage1.py`). Data: a `uniecg prep` folder
(`config.data.source=/path`) or, by default, the bundled real records (minus a held-out set by
patient) plus synthetic ECGs with known heart rate. The whole model starts from a GEM release
(`config.init.gem_dir`, `convert.gem`), or the LLM from an HF checkpoint (`config.init.hf_dir`) or
random (tiny config) and the ECG encoder from an ECG-CoCa checkpoint (`config.init.ecg_encoder_ckpt`)
or random.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uniecg_jax.config import replace_values
from uniecg_jax.errors import ConfigError
from uniecg_jax.convert import gem, hf_clip
from uniecg_jax.convert.ecg_coca import import_ecg_coca
from uniecg_jax.convert.hf_llm import load_hf_params, model_config_from_hf
from uniecg_jax.data.augment import roll_in_time
from uniecg_jax.data.bundled import bundled_split
from uniecg_jax.data.multimodal import with_rendered_images
from uniecg_jax.data.pipelines import records_source, stage1_loader
from uniecg_jax.data.synthetic import stretched_copies
from uniecg_jax.data.tokenizer import load_tokenizer
from uniecg_jax.models.stage1 import UniECGConfig, build_unified, expand_at_placeholder, \
    expand_inputs, expand_multimodal_inputs, next_real_targets
from uniecg_jax.models.vocabulary import grow_vocab_rows
from uniecg_jax.layers.params import abstract_params, count_params
from uniecg_jax.train.lm import llm_flops_per_token, next_token_loss
from uniecg_jax.inference.interpret import model_exporter
from uniecg_jax.models.llm import LLMConfig
from uniecg_jax.train.loop import TrainTask
from uniecg_jax.train.schema import load_train_config


def resolve_tokenizer(config: ml_collections.ConfigDict):
    """The tokenizer this config trains with: data.tokenizer, else init.gem_dir's, else
    init.hf_dir's, else tiny; `<ecg>` is added only for a "token" placeholder."""
    path = config.data.tokenizer or config.init.get("gem_dir") or config.init.hf_dir or None
    placeholder = (gem.GEM_INPUT.placeholder if config.init.get("gem_dir")
                   else config.model.get("input", {}).get("placeholder", "token"))
    return load_tokenizer(path, placeholder=placeholder), path


def finalize_model_config(config: ml_collections.ConfigDict, tokenizer
                          ) -> ml_collections.ConfigDict:
    """A new config whose `model.llm` matches the HF checkpoint (if any) and the tokenizer's
    vocabulary and special ids (`config` itself is left as it is). With `init.gem_dir` the
    release sets every model shape and the input layout (`convert.gem.release_model_config`)."""
    changes = {}
    if config.init.get("gem_dir"):
        model = gem.release_model_config(config.init.gem_dir, config.model,
                                         config.init.ecg_encoder_ckpt or None)
        config = replace_values(config, {"model": model})
    llm = config.model.llm.to_dict()
    if config.init.hf_dir:
        hf_model = model_config_from_hf(config.init.hf_dir).to_dict()
        for key, value in hf_model.items():
            if key in ("param_dtype", "dtype", "remat", "scan_layers", "attention_query_chunk"):
                continue
            llm[key] = value
        changes["model.projector.llm_hidden_size"] = llm["hidden_size"]
    if len(tokenizer) > llm["vocab_size"]:
        if not config.init.hf_dir:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but model.llm.vocab_size "
                             f"is {llm['vocab_size']}")
        llm["vocab_size"] = len(tokenizer)  # `<ecg>` added to the HF tokenizer
    llm["pad_token_id"] = int(tokenizer.pad_token_id)
    llm["eos_token_id"] = int(tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        llm["bos_token_id"] = int(tokenizer.bos_token_id)
    changes["model.llm"] = llm
    return replace_values(config, changes)


def stage1_data_source(config: ml_collections.ConfigDict, split: str,
                       conversations: str | None = "build"):
    """What `stage1_loader` reads: a prep folder path, or an in-memory source of bundled data
    (the train split with `data.synthetic_stretches` time-stretched copies of each synthetic
    record, `data.synthetic.stretched_copies`), with each record's grounded conversation built
    (`conversations="build"`) or none (None: the image tower's pretraining reads no text)."""
    if config.data.source != "bundled":
        return config.data.source
    records = bundled_split(int(config.data.holdout_every), int(config.data.num_synthetic),
                            int(config.seed))[split]
    stretches = int(config.data.get("synthetic_stretches", 0))
    if split == "train" and stretches:
        records = records + stretched_copies(records, stretches, int(config.seed))
    return records_source(records, conversations=conversations)


def drop_modalities(ecg_present: jax.Array, image_present: jax.Array, rng: jax.Array,
                    ecg_dropout: float, image_dropout: float) -> tuple[jax.Array, jax.Array]:
    """Modality dropout: [B] presence flags -> the flags the model sees this step.

    Only an example carrying BOTH inputs loses one: the ECG with probability `ecg_dropout`, the
    image with `image_dropout`, drawn independently; when both draws hit, a fair coin keeps one
    of the two (an example never loses its last input, so one model learns to answer from a
    signal alone, an image alone and both). A single-input example is never touched.
    """
    ecg_rng, image_rng, coin_rng = jax.random.split(rng, 3)
    shape = ecg_present.shape
    both = (ecg_present > 0) & (image_present > 0)
    drop_ecg = jax.random.bernoulli(ecg_rng, ecg_dropout, shape) & both
    drop_image = jax.random.bernoulli(image_rng, image_dropout, shape) & both
    keep_ecg = jax.random.bernoulli(coin_rng, 0.5, shape)
    clash = drop_ecg & drop_image
    drop_ecg = jnp.where(clash, ~keep_ecg, drop_ecg)
    drop_image = jnp.where(clash, keep_ecg, drop_image)
    return (jnp.where(drop_ecg, 0, ecg_present).astype(jnp.int32),
            jnp.where(drop_image, 0, image_present).astype(jnp.int32))


def stage1_loss(model, params, batch, rng=None, augment: bool = False,
                ecg_dropout: float = 0.0, image_dropout: float = 0.0) -> tuple[jax.Array, dict]:
    """Masked next-token loss over the placeholder-expanded sequence.

    With an image tower the batch also carries `image` [B, H, W, C] and `ecg_present` /
    `image_present` [B]; modality dropout (`drop_modalities`) applies whenever `rng` is given.
    """
    ecg = roll_in_time((batch["ecg"],), rng, axis=-1)[0] if augment else batch["ecg"]
    ucfg = model.config
    pad = ucfg.llm.pad_token_id
    if ucfg.vision is None:
        logits = model.apply({"params": params}, batch["input_ids"], ecg,
                             batch["ecg_position"], batch["attention_mask"])
        ids, mask, _ = expand_inputs(batch["input_ids"], batch["attention_mask"],
                                     batch["ecg_position"], ucfg.num_ecg_tokens, pad)
    else:
        ecg_present, image_present = batch["ecg_present"], batch["image_present"]
        if rng is not None:
            ecg_present, image_present = drop_modalities(
                ecg_present, image_present, jax.random.fold_in(rng, 1), ecg_dropout,
                image_dropout)
        logits = model.apply({"params": params}, batch["input_ids"], ecg, batch["ecg_position"],
                             batch["attention_mask"], image=batch["image"],
                             ecg_present=ecg_present, image_present=image_present)
        ids, mask, _ = expand_multimodal_inputs(
            batch["input_ids"], batch["attention_mask"], batch["ecg_position"], ecg_present,
            image_present, ucfg.num_ecg_tokens, ucfg.num_image_tokens, pad)
    loss_mask = expand_at_placeholder(batch["loss_mask"], batch["ecg_position"], ucfg.num_slots,
                                      0)
    # Each real position predicts the next real token (absent slots are skipped).
    targets, target_mask = next_real_targets(ids, mask, loss_mask)
    return next_token_loss(logits, targets, target_mask)


def multimodal_abstract_batch(ucfg: UniECGConfig, global_batch: int) -> dict:
    """The batch entries an image tower adds (none without one): `image` [B, H, W, C] float32,
    `ecg_present` / `image_present` [B] int32."""
    if ucfg.vision is None:
        return {}
    flags = jax.ShapeDtypeStruct((global_batch,), jnp.int32)
    return {"image": jax.ShapeDtypeStruct((global_batch, *ucfg.image_shape), jnp.float32),
            "ecg_present": flags, "image_present": flags}


def encoder_flops_per_ecg(ucfg: UniECGConfig) -> float:
    """Training FLOPs (fwd + bwd = 3x forward) of the ECG tower for one ECG."""
    enc, proj = ucfg.encoder, ucfg.projector
    tokens = enc.num_tokens
    per_token = 2 * (4 * enc.width ** 2 + 2 * enc.width * enc.mlp_dim) * enc.layers
    attention = 4 * tokens * enc.width * enc.layers
    patching = 2 * enc.num_leads * enc.patch_size * enc.width
    projector = 2 * (enc.width * proj.ecg_proj_dim + proj.ecg_proj_dim * proj.llm_hidden_size
                     + proj.llm_hidden_size ** 2)
    return 3.0 * tokens * (per_token + attention + patching + projector)


def build_task(config: ml_collections.ConfigDict) -> TrainTask:
    """The `stage1` TrainTask: UniECG on grounded conversations."""
    tokenizer, tokenizer_path = resolve_tokenizer(config)
    config = finalize_model_config(config, tokenizer)
    train_config = load_train_config(config)
    model, ucfg = build_unified(config.model)
    max_length = int(config.data.max_length)
    num_ecg = ucfg.num_ecg_tokens
    ecg_shape = (ucfg.encoder.num_leads, ucfg.encoder.num_samples)

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, max_length), jnp.int32), jnp.zeros((1, *ecg_shape)),
                          jnp.zeros((1,), jnp.int32))["params"]

    augment = train_config.augment_roll
    if (train_config.ecg_dropout or train_config.image_dropout) and ucfg.vision is None:
        raise ConfigError("train.ecg_dropout / train.image_dropout need an image tower "
                          "(model.vision_tower): a signal-only model has one input to drop")

    def loss_fn(params, batch, rng):
        return stage1_loss(model, params, batch, rng, augment, train_config.ecg_dropout,
                           train_config.image_dropout)

    def make_data(process_index, process_count, local_batch):
        loader = stage1_loader(stage1_data_source(config, "train"), tokenizer,
                               max_length=max_length, batch_size=local_batch, split="train",
                               system=config.data.system or None, input_format=ucfg.input,
                               seed=int(config.seed),
                               process_index=process_index, process_count=process_count,
                               worker_count=int(config.data.worker_count))
        if ucfg.vision is None:
            return iter(loader)
        return with_rendered_images(loader, ucfg.vision.image_size, ucfg.vision.image_aspect_ratio,
                                    ucfg.input.ecg_lead_order,
                                    bool(config.data.get("image_distortions", False)),
                                    int(config.seed))

    def abstract_batch(global_batch):
        tokens = jax.ShapeDtypeStruct((global_batch, max_length), jnp.int32)
        return {"input_ids": tokens, "loss_mask": tokens, "attention_mask": tokens,
                "ecg": jax.ShapeDtypeStruct((global_batch, *ecg_shape), jnp.float32),
                "ecg_position": jax.ShapeDtypeStruct((global_batch,), jnp.int32),
                **multimodal_abstract_batch(ucfg, global_batch)}

    initial_params = None
    if (config.init.hf_dir or config.init.ecg_encoder_ckpt or config.init.get("gem_dir")
            or config.init.get("clip_dir")):
        initial_params = functools.partial(_pretrained_params, config, model, tokenizer)

    llm_params = ucfg.llm.num_params()
    seq = max_length + num_ecg - 1
    batch = int(config.train.batch_size)
    flops = batch * (llm_flops_per_token(config.model.llm, seq, llm_params) * seq
                     + encoder_flops_per_ecg(ucfg))
    source = ("bundled records (held-out patients excluded) + "
              f"{config.data.num_synthetic} synthetic ECGs" if config.data.source == "bundled"
              else config.data.source)
    task = TrainTask(
        name="stage1", init_params=init_params, loss_fn=loss_fn, make_data=make_data,
        abstract_batch=abstract_batch, flops_per_step=flops, tokens_per_step=batch * seq,
        num_params=count_params(abstract_params(init_params, jax.random.PRNGKey(0))),
        data_description=f"{source}; tokenizer {tokenizer_path or 'tiny (bundled)'}; "
                         f"{num_ecg} ECG tokens + {max_length} text tokens per example",
        initial_params=initial_params, config=config, tokenizer=tokenizer,
        export=model_exporter(config, tokenizer))
    return task


def _pretrained_params(config, model, tokenizer, mesh, abstract_params) -> Any:
    """The LLM subtree from HF, the ECG tower from ECG-CoCa and/or the image tower from an HF CLIP
    vision checkpoint (`init.clip_dir`: openai/clip-vit-large-patch14-336's layout, what LLaVA and
    GEM start from), placed on `abstract_params`' shardings; only the subtrees no pretrained file
    fills are randomly initialised.

    The HF embedding (and untied lm_head) grows to the tokenizer's vocabulary when `<ecg>` was
    added: new rows are the mean of the pretrained ones.
    """
    if config.init.get("gem_dir"):
        return gem.import_gem(config.init.gem_dir, abstract_params=abstract_params,
                              model_config=config.model,
                              ecg_tower_ckpt=config.init.ecg_encoder_ckpt or None).params
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    # The jitted init returns only the randomly initialised subtrees, so XLA drops the rest of the
    # init: an HF-initialised LLM's random weights are never computed or allocated. (The tower is
    # still drawn when ECG-CoCa fills it: the import may cover only some of its groups.)
    clip_dir = config.init.get("clip_dir")
    if clip_dir and "vision_tower" not in abstract_params:
        raise ConfigError(f"init.clip_dir={clip_dir}: this model has no image tower "
                          "(model.vision_tower is unset: use an *_image or a 7B variant)")
    pretrained = {"llm": bool(config.init.hf_dir), "vision_tower": bool(clip_dir)}
    random_keys = [key for key in abstract_params if not pretrained.get(key)]
    params = dict(jax.jit(
        lambda rng: {key: nn.meta.unbox(model.init(rng, *_dummy_inputs(model, config))["params"][
            key]) for key in random_keys},
        out_shardings={key: shardings[key] for key in random_keys})(
            jax.random.PRNGKey(int(config.seed))))
    if config.init.hf_dir:
        ours = model.config.llm
        hf_config = model_config_from_hf(config.init.hf_dir)
        hf_config.param_dtype = ours.param_dtype if isinstance(ours.param_dtype, str) else str(
            np.dtype(ours.params_dtype))
        llm = load_hf_params(config.init.hf_dir, LLMConfig.from_config(hf_config), mesh=mesh)
        llm = grow_vocab_rows(llm, ours.vocab_size)
        params["llm"] = jax.device_put(llm, shardings["llm"])
    if clip_dir:   # the tower's own config must match the checkpoint's: shapes are checked
        params["vision_tower"] = hf_clip.load_clip_vision(clip_dir, model.config.vision,
                                                          abstract=abstract_params["vision_tower"])
    if config.init.ecg_encoder_ckpt:
        imported = import_ecg_coca(config.init.ecg_encoder_ckpt, model.config.encoder,
                                   model.config.projector).params
        tower = dict(params["ecg_tower"])
        for group, values in imported.items():
            tower[group] = jax.device_put(values, shardings["ecg_tower"][group])
        params["ecg_tower"] = tower
    return params


def _dummy_inputs(model, config):
    enc = model.config.encoder
    return (jnp.zeros((1, int(config.data.max_length)), jnp.int32),
            jnp.zeros((1, enc.num_leads, enc.num_samples)), jnp.zeros((1,), jnp.int32))
