"""The optimizer: AdamW, linear warmup + cosine decay, global-norm clipping, weight-decay mask and
freezing of parameter groups by regex.

Frozen parameters go through `optax.set_to_zero()` inside `optax.multi_transform`, which hands the
AdamW branch a tree with `optax.MaskedNode()` in their place: they get no moment buffers at all, and
their updates are exact zeros, so they stay bit-identical. Gradient accumulation is done by the train
step (`lax.scan` over microbatches, `uniecg_jax/train/step.py`), not by `optax.MultiSteps`, so the
optimizer sees one averaged gradient per step and its state holds no accumulation buffer.

`train.ema_decay` > 0 also keeps an exponential moving average of the weights in the optimizer
state (`ParamsEMA`, sharded like the parameters and checkpointed with them); `export_params(state)`
is what a trained model exports: the average when kept, else the weights.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from uniecg_jax.config import ConfigError
from uniecg_jax.layers.params import path_name

TRAINABLE = "trainable"
FROZEN = "frozen"

# Parameter-name fragments that get no weight decay (norm scales, biases, RMSNorm weights).
_NO_DECAY = re.compile(r"(^|/)(bias|scale|.*norm.*|.*_ln.*|ln_.*)(/|$)", re.IGNORECASE)


def learning_rate_schedule(train_config: Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup 0 -> learning_rate over `warmup_steps`, then cosine decay to
    `learning_rate * min_lr_ratio` at step `steps` (and flat after)."""
    peak = float(train_config["learning_rate"])
    warmup = int(train_config["warmup_steps"])
    total = max(int(train_config["steps"]), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total,
        end_value=peak * float(train_config["min_lr_ratio"]))


def weight_decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: matrices/kernels, not norms, biases or scalars."""
    def decays(key_path, leaf):
        path = path_name(key_path)
        return len(getattr(leaf, "shape", ())) >= 2 and not _NO_DECAY.search(path)
    return jax.tree_util.tree_map_with_path(decays, params)


def freeze_labels(params: Any, freeze_regex: str) -> Any:
    """`"frozen"` for leaves whose path (`a/b/kernel`) matches `freeze_regex` (re.search), else
    `"trainable"`. An empty regex freezes nothing; a regex that matches nothing is an error, since a
    typo there would silently train what the user meant to keep fixed."""
    if not freeze_regex:
        return jax.tree.map(lambda _: TRAINABLE, params)
    try:
        pattern = re.compile(freeze_regex)
    except re.error as e:
        raise ConfigError(f"train.freeze: invalid regex {freeze_regex!r}: {e}") from None
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: FROZEN if pattern.search(path_name(kp)) else TRAINABLE, params)
    if FROZEN not in jax.tree.leaves(labels):
        some = [path_name(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)[:5]]
        raise ConfigError(f"train.freeze={freeze_regex!r} matches no parameter; paths look like {some}")
    return labels


def make_optimizer(train_config: Mapping[str, Any], params: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule, Any]:
    """AdamW with the schedule, clipping, decay mask and freezing described by `train_config`.

    Args:
      train_config: `config.train` (learning_rate, warmup_steps, steps, min_lr_ratio, weight_decay,
        b1, b2, grad_clip (0 = off), freeze (regex, "" = none)).
      params: the param tree, concrete or abstract (only paths and shapes are read).
    Returns:
      (tx, schedule, labels): the transformation, the learning-rate schedule (for logging) and the
      per-leaf "trainable"/"frozen" labels.
    """
    schedule = learning_rate_schedule(train_config)
    labels = freeze_labels(params, str(train_config["freeze"]))
    chain = []
    if float(train_config["grad_clip"]) > 0:
        # Inside the trainable branch, so the norm is over trained parameters only.
        chain.append(optax.clip_by_global_norm(float(train_config["grad_clip"])))
    chain.append(optax.adamw(
        learning_rate=schedule, b1=float(train_config["b1"]), b2=float(train_config["b2"]),
        eps=float(train_config["eps"]), weight_decay=float(train_config["weight_decay"]),
        mask=weight_decay_mask))
    tx = optax.multi_transform({TRAINABLE: optax.chain(*chain), FROZEN: optax.set_to_zero()}, labels)
    if float(train_config["ema_decay"]) > 0:
        tx = with_params_ema(tx, float(train_config["ema_decay"]))
    return tx, schedule, labels


class ParamsEMA(NamedTuple):
    """Optimizer state of `with_params_ema`: the wrapped state, the update count and the average
    (a float32 tree like the params; frozen leaves stay equal to the params)."""
    inner: Any
    count: jax.Array
    ema: Any


def with_params_ema(tx: optax.GradientTransformation, decay: float
                    ) -> optax.GradientTransformation:
    """`tx` plus an exponential moving average of the parameters *after* each update.

    Why: small batches at a high learning rate leave the last iterate noisy, and the average is
    a better denoiser; most diffusion models sample from one (DDPM, Stable Diffusion, diffusers'
    `EMAModel`). DiffuSETS keeps none (PKUDigitalHealth/DiffuSETS 4d98537 utils/train.py saves
    the weights of the lowest-loss epoch). The decay warms up as `min(decay, (1 + n) / (10 + n))`
    after n updates (diffusers' default), so a short run's average is not dominated by the
    initial weights. Updates pass through unchanged.
    """
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1) (0 = off), got {decay}")

    def init(params):
        return ParamsEMA(tx.init(params), jnp.zeros((), jnp.int32),
                         jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("with_params_ema needs the params in update()")
        updates, inner = tx.update(updates, state.inner, params)
        new_params = optax.apply_updates(params, updates)
        count = state.count + 1
        rate = jnp.minimum(decay, (1.0 + count) / (10.0 + count)).astype(jnp.float32)
        ema = jax.tree.map(lambda e, p: e + (1.0 - rate) * (p.astype(jnp.float32) - e),
                           state.ema, new_params)
        return updates, ParamsEMA(inner, count, ema)

    return optax.GradientTransformation(init, update)


def export_params(state: Any) -> Any:
    """The parameters a trained model exports from a train state: the weight average of
    `with_params_ema` (cast to the params' dtypes) when the optimizer keeps one, else the
    params."""
    if isinstance(state.opt_state, ParamsEMA):
        return jax.tree.map(lambda e, p: e.astype(p.dtype), state.opt_state.ema, state.params)
    return state.params
