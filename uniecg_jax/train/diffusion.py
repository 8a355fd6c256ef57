"""The `diffusion` objective: the DiffuSETS VAE, then the conditional UNet on frozen VAE latents.

    uniecg train --config configs/diffusion.py:tiny --workdir W

Two phases of the shared train loop (`build_task(config).phases`, trained in order by
`uniecg_jax.train.loop.run`), each with its own TrainTask, checkpoints and metrics.jsonl:

  W/vae    VAE (reconstruction + `train.kl_weight` x KL), `train.vae_steps` steps;
  W/unet   UNet (epsilon/v MSE with classifier-free-guidance condition dropout
           `diffusion.cfg_dropout`), `train.unet_steps` steps. Its params are
           `{"unet": ..., "vae": ...}` with `vae/` frozen by the optimizer (no Adam moments, exact
           zero updates), so the frozen VAE is sharded, checkpointed and restored like the rest;
           with `train.ema_decay` the export holds the UNet's weight average (`optim.export_params`);
  W/model  the export (`uniecg_jax.diffusion.pipeline.load_pipeline(W/model)`).

Rerunning the command resumes whichever phase was interrupted (a finished VAE phase restores its
final checkpoint and runs no step). With `model.vae.auto_scale` the UNet phase's config gets
`model.vae.scaling_factor` from the trained VAE (a new config; the loaded one is never rewritten).
Data: the bundled real records plus synthetic ECGs at `data.synthetic_heart_rates` (generated once,
cached on disk under `data.cache_dir`, default W/data_cache), or a `uniecg prep` folder
(`data.source=/path`, with text embeddings).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uniecg_jax.checkpoint import save_model
from uniecg_jax.data.bundled import diffusion_records
from uniecg_jax.data.text_encoder import text_encoder_for
from uniecg_jax.config import replace_values
from uniecg_jax.data.examples import example_to_record, read_shards, shard_paths
from uniecg_jax.data.pipelines import diffusion_loader, records_source
from uniecg_jax.diffusion import losses
from uniecg_jax.diffusion.rhythm import RHYTHM_CHANNELS
from uniecg_jax.layers.params import abstract_params, count_params, init_params_on_host
from uniecg_jax.models.unet import ConditionalUNet, UNetConfig
from uniecg_jax.models.vae import VAE, VAEConfig
from uniecg_jax.train.loop import Phase, TrainTask
from uniecg_jax.train.schema import load_train_config

VAE_DIR, UNET_DIR, MODEL_DIR = "vae", "unet", "model"
FROZEN_VAE = "^vae/"

def phase_config(config: ml_collections.ConfigDict, phase: str) -> ml_collections.ConfigDict:
    """The (new) config one phase trains with: `train.steps` = vae_steps / unet_steps; the UNet
    phase freezes `vae/` in addition to any user `train.freeze`."""
    if phase not in ("vae", "unet"):
        raise ValueError(f"phase must be 'vae' or 'unet', got {phase!r}")
    changes = {"train.steps": int(config.train[f"{phase}_steps"])}
    if phase == "vae":
        # `train.ema_decay` averages the UNet (the sampler's denoiser); the VAE phase trains and
        # hands over its last weights, as before.
        changes["train.ema_decay"] = 0.0
    if phase == "unet":
        user = str(config.train.freeze)
        changes["train.freeze"] = FROZEN_VAE if not user else f"{FROZEN_VAE}|{user}"
    return replace_values(config, changes)


# ----------------------------------------------------------------------------------------- data

def diffusion_data_source(config: ml_collections.ConfigDict):
    """What `diffusion_loader` reads: a prep folder path or an in-memory source with embeddings."""
    if config.data.source != "bundled":
        return str(config.data.source)
    return records_source(diffusion_records(config), text_encoder=text_encoder_for(config))


def to_loss_batch(batch: dict) -> dict:
    """Data-pipeline names -> the names `diffusion.losses` read (ecg, hr); a precomputed scaled
    `latent` `[B, L/8, 4]`, when present, replaces encoding `signal` with the frozen VAE; `rhythm`
    passes through."""
    out = {"text_embedding": batch["text_embedding"], "sex": batch["sex"], "age": batch["age"],
           "hr": batch["heart_rate"]}
    out.update({"latent": batch["latent"]} if "latent" in batch else {"ecg": batch["signal"]})
    if "rhythm" in batch:
        out["rhythm"] = batch["rhythm"]
    return out


_SOURCES: dict = {}


def _cached_source(config: ml_collections.ConfigDict):
    """One in-memory source per data/text config per process (both phases read the same one)."""
    key = json.dumps([config.data.to_dict(), config.text.to_dict(), int(config.seed)],
                     sort_keys=True, default=str)
    if key not in _SOURCES:
        _SOURCES.clear()
        _SOURCES[key] = diffusion_data_source(config)
    return _SOURCES[key]


def _make_data_fn(config: ml_collections.ConfigDict):
    def make_data(process_index, process_count, local_batch):
        loader = diffusion_loader(_cached_source(config), batch_size=local_batch, split="train",
                                  seed=int(config.seed), process_index=process_index,
                                  process_count=process_count,
                                  worker_count=int(config.data.worker_count),
                                  rhythm=bool(config.model.unet.get("rhythm_condition", False)))
        return iter(loader)
    return make_data


def _abstract_batch(config):
    def abstract_batch(global_batch):
        f32 = jnp.float32
        scalar = jax.ShapeDtypeStruct((global_batch,), f32)
        batch = {"signal": jax.ShapeDtypeStruct(
                    (global_batch, int(config.data.num_leads), int(config.data.signal_length)), f32),
                "text_embedding": jax.ShapeDtypeStruct((global_batch, int(config.text.embed_dim)),
                                                       f32),
                "sex": scalar, "age": scalar, "heart_rate": scalar,
                "condition_known": jax.ShapeDtypeStruct((global_batch, 3), f32),
                "record_key": jax.ShapeDtypeStruct((global_batch,), jnp.int64
                                                   if jax.config.jax_enable_x64 else jnp.int32)}
        if config.model.unet.get("rhythm_condition", False):
            batch["rhythm"] = jax.ShapeDtypeStruct(
                (global_batch, int(config.data.signal_length), RHYTHM_CHANNELS), f32)
        return batch
    return abstract_batch


# ---------------------------------------------------------------------------------------- tasks

def build_models(config: ml_collections.ConfigDict) -> tuple[VAE, ConditionalUNet]:
    vae = VAE(VAEConfig.from_config(config.model.vae))
    unet = ConditionalUNet(UNetConfig.from_config(config.model.unet, config.diffusion.num_steps))
    return vae, unet


def _vae_inputs(config):
    return (jnp.zeros((1, int(config.data.signal_length), int(config.data.num_leads))),)


def _unet_inputs(unet: ConditionalUNet):
    cfg = unet.cfg
    return (jnp.zeros((1, cfg.latent_length, cfg.latent_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, cfg.condition_dim)))


def forward_flops(apply_fn, abstract_params: Any, *inputs: Any) -> float:
    """FLOPs of one forward pass from XLA's cost analysis of the lowered (not compiled) program."""
    try:
        lowered = jax.jit(apply_fn).lower(abstract_params, *inputs)
        cost = lowered.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        return float((cost or {}).get("flops", 0.0))
    except Exception:  # cost analysis is best-effort (used for MFU logging only)
        return 0.0


def _sharded_host_init(model, seed, inputs):
    """`(mesh, abstract) -> params` drawn on the host (no `jit(model.init)` compile, which takes
    minutes for the 7-level UNet on XLA:CPU) and placed on the abstract tree's shardings."""
    def initial(mesh, abstract_params):
        del mesh
        host = init_params_on_host(model, seed, *inputs)["params"]
        return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), host,
                            abstract_params)
    return initial


def build_vae_task(config: ml_collections.ConfigDict) -> TrainTask:
    """Phase 1: the VAE on ECGs `[B, 12, 1024]`."""
    config = phase_config(config, "vae")
    vae, _ = build_models(config)
    inputs = _vae_inputs(config)

    def init_params(rng):
        return vae.init(rng, *inputs)["params"]

    def loss_fn(params, batch, rng):
        return losses.vae_loss({"params": params}, to_loss_batch(batch), rng, vae, config)

    abstract = abstract_params(init_params, jax.random.PRNGKey(0))
    length = int(config.data.signal_length)
    batch = int(config.train.batch_size)
    flops = 3.0 * batch * forward_flops(lambda p, x: vae.apply({"params": p}, x), abstract,
                                        *inputs)
    return TrainTask(
        name="diffusion/vae", init_params=init_params, loss_fn=loss_fn,
        make_data=_make_data_fn(config), abstract_batch=_abstract_batch(config),
        flops_per_step=flops, tokens_per_step=batch * length,
        num_params=count_params(abstract), data_description=lambda: describe_data(config),
        initial_params=_sharded_host_init(vae, int(config.seed), inputs), config=config)


def build_unet_task(config: ml_collections.ConfigDict, vae_params: Any = None) -> TrainTask:
    """Phase 2: the UNet on latents of the frozen VAE. Params are `{"unet", "vae"}`; `vae_params`
    (the trained VAE `params` tree, any placement) fills `vae` when no UNet checkpoint exists."""
    config = phase_config(config, "unet")
    vae, unet = build_models(config)
    vae_inputs, unet_inputs = _vae_inputs(config), _unet_inputs(unet)

    def init_params(rng):
        vae_rng, unet_rng = jax.random.split(rng)
        return {"unet": unet.init(unet_rng, *unet_inputs)["params"],
                "vae": vae.init(vae_rng, *vae_inputs)["params"]}

    def loss_fn(params, batch, rng):
        frozen_vae = {"params": jax.lax.stop_gradient(params["vae"])}
        return losses.diffusion_loss({"params": params["unet"]}, to_loss_batch(batch), rng, unet,
                                     config, vae=vae, vae_params=frozen_vae)

    def initial_params(mesh, abstract_params):
        unet_part = _sharded_host_init(unet, int(config.seed), unet_inputs)(
            mesh, abstract_params["unet"])
        if vae_params is None:
            vae_part = _sharded_host_init(vae, int(config.seed), vae_inputs)(
                mesh, abstract_params["vae"])
        else:
            vae_part = jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding),
                                    vae_params, abstract_params["vae"])
        return {"unet": unet_part, "vae": vae_part}

    abstract = abstract_params(init_params, jax.random.PRNGKey(0))
    latent_length = unet.cfg.latent_length
    batch = int(config.train.batch_size)
    # UNet fwd+bwd plus the frozen VAE encoder's forward.
    flops = batch * (
        3.0 * forward_flops(lambda p, *x: unet.apply({"params": p}, *x), abstract["unet"],
                            *unet_inputs)
        + forward_flops(lambda p, x: vae.apply({"params": p}, x, method=VAE.encode),
                        abstract["vae"], *vae_inputs))
    return TrainTask(
        name="diffusion/unet", init_params=init_params, loss_fn=loss_fn,
        make_data=_make_data_fn(config), abstract_batch=_abstract_batch(config),
        flops_per_step=flops, tokens_per_step=batch * latent_length,
        num_params=count_params(abstract), data_description=lambda: describe_data(config),
        initial_params=initial_params, config=config,
        export=lambda workdir, params: export_model(os.path.join(workdir, MODEL_DIR), params,
                                                    config))


def with_cache_dir(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """`config` with `data.cache_dir` = WORKDIR/data_cache when it is "" (a new config)."""
    if config.data.cache_dir:
        return config
    return replace_values(config, {"data.cache_dir": os.path.join(os.path.abspath(workdir),
                                                                  "data_cache")})


def build_task(config: ml_collections.ConfigDict) -> TrainTask:
    """The diffusion TrainTask: phases VAE (W/vae) then UNet (W/unet, on the VAE phase's final
    params), trained by `loop.run`. Its own fields are the UNet phase with a fresh VAE: the step
    `uniecg dry-run` compiles (the bigger one, including the frozen VAE encoder)."""
    load_train_config(config)  # strict: an unknown train key fails here

    def vae_phase(workdir: str, previous: Any) -> TrainTask:
        del previous
        return build_vae_task(with_cache_dir(config, workdir))

    def unet_phase(workdir: str, vae_params: Any) -> TrainTask:
        phase = with_cache_dir(config, workdir)
        if phase.model.vae.auto_scale:
            factor = latent_scaling_factor(phase, vae_params)
            phase = replace_values(phase, {"model.vae.scaling_factor": factor})
            if jax.process_index() == 0:
                print(f"[diffusion] latent scaling factor {factor:.5f} (1 / std of the trained "
                      "VAE's latents)", flush=True)
        return build_unet_task(phase, vae_params)

    return dataclasses.replace(build_unet_task(config), name="diffusion",
                               phases=(Phase(VAE_DIR, vae_phase), Phase(UNET_DIR, unet_phase)))


def describe_data(config: ml_collections.ConfigDict) -> str:
    if config.data.source != "bundled":
        return f"{config.data.source}; text embeddings from the prep folder"
    return (f"bundled records + {config.data.num_synthetic} synthetic ECGs at "
            f"{list(config.data.synthetic_heart_rates)} bpm; text encoder {config.text.encoder} "
            f"({config.text.get('template', 'plain')} template)")


# -------------------------------------------------------------------------------- run + export

def export_model(directory: str, params: Any, config: ml_collections.ConfigDict) -> str:
    """Writes `{"vae", "unet"}` params + config.json as a model checkpoint `DiffusionPipeline`
    loads with `load_pipeline(directory)`."""
    params = {"vae": jax.device_get(params["vae"]), "unet": jax.device_get(params["unet"])}
    return save_model(directory, params, config)


def latent_scaling_factor(config: ml_collections.ConfigDict, vae_params, max_records: int = 256
                          ) -> float:
    """1 / std of the trained VAE's latent means over (up to `max_records`) training ECGs.

    The DDPM schedule assumes unit-variance data; DiffuSETS's fixed 0.18215 (kept for its released
    weights, `model.vae.auto_scale=False`) only fits a VAE whose latents have std ~5.5. A VAE trained
    here gets its own factor, as Stable Diffusion derived 0.18215 from its VAE.
    """
    if config.data.source == "bundled":
        records = diffusion_records(config)[:max_records]
        ecgs = np.stack([r.to_diffusion_input() for r in records])
    else:
        examples = read_shards(shard_paths(str(config.data.source), "train"))[:max_records]
        ecgs = np.stack([example_to_record(e).to_diffusion_input() for e in examples])
    vae = VAE(VAEConfig.from_config(config.model.vae))
    params = vae_params["vae"] if "vae" in vae_params else vae_params
    _, mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=VAE.encode))(
        params, jnp.asarray(ecgs.transpose(0, 2, 1)))
    return float(1.0 / max(float(jnp.std(mean)), 1e-6))
