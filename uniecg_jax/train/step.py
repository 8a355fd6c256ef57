"""A generic, pure train step: `train_step(state, batch, rng) -> (state, metrics)`.

Built from any objective's `loss_fn(params, batch, rng) -> (loss, aux_metrics)`. Gradient accumulation
is a `lax.scan` over microbatches (memory of one microbatch, one optimizer update per step). The step is
jitted with explicit in/out shardings and `donate_argnums=0`, so the old state's buffers are reused for
the new one and the optimizer update needs no second copy of params and moments.

Token-weighted accumulation: if `aux_metrics` has `num_tokens` (the loss's denominator, e.g. unmasked
target tokens; otherwise the microbatch's rows), each microbatch's gradient is weighted by it and the
sum divided by the step's total, so k microbatches give the gradient of one big batch even when masks
differ between them.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from uniecg_jax import sharding as sharding_lib
from uniecg_jax.train.optim import TRAINABLE
from uniecg_jax.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """[B, ...] -> [k, B/k, ...] with microbatch j = rows j, j+k, j+2k, ...

    Strided (not contiguous) rows keep each device's rows on that device: with the batch dim sharded
    contiguously over (data, fsdp), the [B/k, k] reshape leaves dim 0 sharded exactly as before, so no
    microbatch needs data from another device.
    """
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_microbatches} "
                             "microbatches (train.grad_accum_steps)")
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    labels: Any, grad_accum_steps: int = 1) -> Callable:
    """The pure (un-jitted) step; `jit_train_step` adds shardings and donation.

    Metrics (f32 scalars): loss, grad_norm (of trained params, before clipping), learning_rate (used
    for this update), tokens (summed `num_tokens`, else rows), plus the mean of every other aux metric.
    """
    trainable = jax.tree.map(lambda label: label == TRAINABLE, labels)

    def microbatch_grads(params, microbatch, rng):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, microbatch, rng)
        aux = dict(aux)
        rows = jax.tree.leaves(microbatch)[0].shape[0]
        weight = jnp.asarray(aux.pop("num_tokens", rows), jnp.float32)
        return loss, aux, grads, weight

    def train_step(state: TrainState, batch: Any, rng: jax.Array):
        if grad_accum_steps == 1:
            loss, aux, grads, tokens = microbatch_grads(state.params, batch, rng)
        else:
            microbatches = split_microbatches(batch, grad_accum_steps)

            def body(carry, inputs):
                grad_sum, loss_sum, aux_sum, weight_sum = carry
                microbatch, index = inputs
                loss, aux, grads, weight = microbatch_grads(
                    state.params, microbatch, jax.random.fold_in(rng, index))
                # Weighting by the loss's own denominator turns per-microbatch means into one
                # big-batch mean after the division below.
                grad_sum = jax.tree.map(lambda g, acc: acc + weight * g.astype(jnp.float32),
                                        grads, grad_sum)
                aux_sum = jax.tree.map(lambda a, acc: acc + weight * a, aux, aux_sum)
                return (grad_sum, loss_sum + weight * loss, aux_sum, weight_sum + weight), None

            first = jax.tree.map(lambda x: x[0], microbatches)
            aux_shapes = jax.eval_shape(lambda: microbatch_grads(state.params, first, rng)[1])
            zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
                     jnp.zeros((), jnp.float32),
                     jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shapes),
                     jnp.zeros((), jnp.float32))
            (grad_sum, loss_sum, aux_sum, tokens), _ = jax.lax.scan(
                body, zeros, (microbatches, jnp.arange(grad_accum_steps)))
            grads = jax.tree.map(lambda g, p: (g / tokens).astype(p.dtype), grad_sum, state.params)
            loss = loss_sum / tokens
            aux = jax.tree.map(lambda a: a / tokens, aux_sum)
        grad_norm = optax.global_norm(
            jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {name: jnp.asarray(value, jnp.float32).mean() for name, value in aux.items()}
        metrics.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm,
                       learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                       tokens=jnp.asarray(tokens, jnp.float32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step: Callable, state_shardings: TrainState, mesh: Mesh) -> Callable:
    """`jax.jit` with explicit shardings: state on `state_shardings` (donated), batch leaves sharded
    on their leading dim over (data, fsdp), rng and metrics replicated."""
    replicated = sharding_lib.replicated(mesh)
    jitted = jax.jit(train_step,
                     in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), replicated),
                     out_shardings=(state_shardings, replicated),
                     donate_argnums=0)

    def call(state, batch, rng):
        with sharding_lib.mesh_context(mesh):
            return jitted(state, batch, rng)
    call.jitted = jitted
    call.lower = lambda *args: _lower(jitted, mesh, *args)
    return call


def _lower(jitted: Callable, mesh: Mesh, *args: Any):
    with sharding_lib.mesh_context(mesh):
        return jitted.lower(*args)


def step_rng(seed: int, step: int | jax.Array) -> jax.Array:
    """The rng of step `step`: fold_in(PRNGKey(seed), step), so a resumed run draws the same keys."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)
