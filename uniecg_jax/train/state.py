"""The train state and its shardings.

`TrainState` is a plain pytree (step, float32 master params, optimizer state). The shardings of the
optimizer state are derived *explicitly* from the parameter shardings: `eval_shape(tx.init)` gives the
abstract optimizer state, and every leaf whose key path ends with a parameter's path and has that
parameter's shape (AdamW's mu/nu) gets that parameter's sharding; scalars (counts) are replicated.
`jit(tx.init)` alone would leave the moments' layout to the compiler, which may replicate them.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from uniecg_jax import sharding as sharding_lib
from uniecg_jax.layers.params import path_parts


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: float32 master weights; opt_state: the optax state."""
    step: jax.Array
    params: Any
    opt_state: Any


def _dict_suffix(key_path: tuple) -> tuple[str, ...]:
    """The trailing run of dict keys of a key path (the part that can name a parameter)."""
    start = len(key_path)
    while start and isinstance(key_path[start - 1], jax.tree_util.DictKey):
        start -= 1
    return path_parts(key_path[start:])


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Shardings for an optimizer state, mirrored from the parameters they belong to.

    A leaf gets a parameter's sharding when the trailing dict keys of its path end with that
    parameter's full path and the shapes agree; every other leaf (step counts, scalars) is replicated.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for (key_path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                          jax.tree.leaves(param_shardings)):
        by_path[path_parts(key_path)] = (tuple(leaf.shape), sharding)
    replicated = sharding_lib.replicated(mesh)

    def leaf_sharding(key_path, leaf):
        suffix = _dict_suffix(key_path)
        shape = tuple(getattr(leaf, "shape", ()))
        for start in range(len(suffix)):
            match = by_path.get(suffix[start:])
            if match is not None and match[0] == shape:
                return match[1]
        return replicated
    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def abstract_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                         mesh: Mesh) -> tuple[TrainState, TrainState]:
    """The train state as ShapeDtypeStructs (carrying shardings) and its tree of shardings.

    Args:
      init_params: `rng -> boxed params` (a flax `init(...)["params"]` with logical partitioning).
      tx: the optimizer.
    Nothing is allocated: this is what the dry run compiles against and what a restore targets.
    """
    abstract_params, param_shardings = sharding_lib.abstract_sharded_init(
        init_params, mesh, jax.random.PRNGKey(0))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh)
    shardings = TrainState(step=sharding_lib.replicated(mesh), params=param_shardings,
                           opt_state=opt_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def init_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                     mesh: Mesh, rng: jax.Array, shardings: TrainState,
                     params: Any | None = None) -> TrainState:
    """Materialises the train state straight onto `shardings` (one jit, nothing unsharded).

    `params`, when given (e.g. imported from a Hugging Face checkpoint, already sharded), replaces the
    random initialisation; the optimizer state is still created on its explicit shardings.
    """
    def build(rng, given_params):
        if given_params is None:
            given_params = nn.meta.unbox(init_params(rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=given_params,
                          opt_state=tx.init(given_params))
    with sharding_lib.mesh_context(mesh):
        if params is None:
            return jax.jit(lambda r: build(r, None), out_shardings=shardings)(rng)
        return jax.jit(build, out_shardings=shardings, donate_argnums=1)(rng, params)
