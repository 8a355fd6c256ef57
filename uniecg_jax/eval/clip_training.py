"""Training, saving and loading the ECG-text CLIP (`models.ecg_clip`) that scores generated ECGs.

    model, variables, losses = train_clip(ecgs [N, 12, L], text_embeddings [N, D], steps=300)
    save_clip(directory, model.cfg, variables, text_encoder="...")
    model, variables, config = load_clip(directory)

`train_clip` is its own small loop rather than a `TrainTask` on the shared loop and optimizer: it
is an in-memory fit of a few hundred steps with the augmentation inside the jitted step, no mesh,
no resumable run checkpoint, and a constant-rate AdamW that decays every leaf.
`train.optim.make_optimizer` (warmup + cosine schedule, no decay on biases/scales) would train a
different CLIP and move every CLIP score and FID reported so far.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from uniecg_jax.checkpoint import restore_model, save_model
from uniecg_jax.errors import CheckpointError
from uniecg_jax.models.ecg_clip import ECGClip, ECGClipConfig, clip_loss, leads_last


def train_clip(ecgs: np.ndarray, text_embeddings: np.ndarray, *, steps: int = 300,
               batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0,
               cfg: ECGClipConfig | None = None, log_every: int = 0) -> tuple[ECGClip, Any, list]:
    """Trains the CLIP on `ecgs` `[N, 12, L]` (mV) paired with frozen `text_embeddings` `[N, D]`;
    returns (model, `{"params": ...}`, losses). Random amplitude scaling (0.8-1.25) and circular
    time shifts augment the few real records."""
    ecgs = leads_last(ecgs)
    text_embeddings = np.asarray(text_embeddings, np.float32)
    if len(ecgs) != len(text_embeddings):
        raise ValueError(f"{len(ecgs)} ECGs but {len(text_embeddings)} text embeddings")
    cfg = cfg or ECGClipConfig(text_embed_dim=int(text_embeddings.shape[1]))
    model = ECGClip(cfg)
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.asarray(ecgs[:1]),
                                         jnp.asarray(text_embeddings[:1])))
    tx = optax.adamw(learning_rate, weight_decay=1e-4)
    opt_state = tx.init(variables)
    batch_size = min(batch_size, len(ecgs))

    @jax.jit
    def step(variables, opt_state, ecg, text, rng):
        scale_key, shift_key = jax.random.split(rng)
        scale = jnp.exp(jax.random.uniform(scale_key, (ecg.shape[0], 1, 1), minval=-0.22,
                                           maxval=0.22))
        shift = jax.random.randint(shift_key, (), 0, ecg.shape[1])
        ecg = jnp.roll(ecg, shift, axis=1) * scale

        def loss_fn(v):
            e, t, s = model.apply(v, ecg, text)
            return clip_loss(e, t, s, text)
        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        index = rng.choice(len(ecgs), batch_size, replace=False)
        variables, opt_state, loss = step(variables, opt_state, jnp.asarray(ecgs[index]),
                                          jnp.asarray(text_embeddings[index]),
                                          jax.random.PRNGKey(seed * 100003 + i))
        losses.append(float(loss))
        if log_every and (i + 1) % log_every == 0:
            print(f"[clip] step {i + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    return model, variables, losses


def save_clip(directory: str, cfg: ECGClipConfig, variables: Any, text_encoder: str) -> str:
    """A model checkpoint: params + config.json with `clip` (shape) and `text.encoder`."""
    config = ml_collections.ConfigDict({"clip": cfg.to_dict(),
                                        "text": {"encoder": text_encoder,
                                                 "embed_dim": cfg.text_embed_dim}})
    return save_model(directory, jax.device_get(variables["params"]), config)


def load_clip(directory: str) -> tuple[ECGClip, Any, Any]:
    """(model, `{"params": ...}`, config) from `save_clip`'s directory."""
    params, config = restore_model(directory)
    if "clip" not in config:
        raise CheckpointError(f"{directory}: config.json has no `clip`; not an ECG-CLIP checkpoint")
    return ECGClip(ECGClipConfig.from_config(config.clip)), {"params": params}, config
