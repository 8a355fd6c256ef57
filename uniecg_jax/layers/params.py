"""Parameter trees: abstract shapes, host-side initialisation, and the names of their leaves.

    abstract = abstract_params(model.init, jax.random.PRNGKey(0), *inputs)   # no allocation
    abstract = abstract_module_params(model, *inputs, sharding=device)       # `params` only
    name = path_name(key_path)                                     # "layers_0/mlp/up/kernel"

Every place that needs a model's parameter shapes (checkpoint restore targets, weight importers,
sharded init, parameter counts) builds them with `abstract_params`; every place that names a leaf by
its key path uses `path_name`, so the names in optimizer masks, checkpoints and exports agree.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Sharding = Any   # a jax.sharding.Sharding, or a function from the boxed tree to a tree of them


def path_parts(key_path: tuple) -> tuple[str, ...]:
    """A pytree key path -> its names: dict keys, attribute names, sequence indices (as text).

    The four former copies (optimizer masks, run-checkpoint reports, model checkpoints, exports)
    agreed on dict and sequence keys, the only keys a parameter tree has; on dataclass fields (a
    TrainState's `params`, optax states) the optimizer's and run checkpoint's reading (the field
    name) is kept, not `str(key)`'s ".params".
    """
    parts = []
    for key in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return tuple(parts)


def path_name(key_path: tuple, separator: str = "/") -> str:
    """`(DictKey('params'), DictKey('layers_0'), ..., DictKey('kernel'))` ->
    `params/layers_0/.../kernel` (`separator` "." for safetensors-style names)."""
    return separator.join(path_parts(key_path))


def abstract_params(init_fn: Callable[..., Any], *args: Any, sharding: Sharding = None) -> Any:
    """`jax.eval_shape(init_fn, *args)` unboxed: `jax.ShapeDtypeStruct` leaves, nothing allocated.

    `sharding`: None (leaves without one), one Sharding for every leaf, or a function from the boxed
    tree (leaves wrapped in `nn.Partitioned`, whose `.names` are the logical axes) to a matching
    tree of shardings (`sharding.abstract_sharded_init` passes the rules table's).
    """
    boxed = jax.eval_shape(init_fn, *args)
    unboxed = nn.meta.unbox(boxed)
    if sharding is None:
        return unboxed
    shardings = sharding(boxed) if callable(sharding) else jax.tree.map(lambda _: sharding, unboxed)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed,
                        shardings)


def abstract_module_params(model: nn.Module, *inputs: Any, sharding: Sharding = None,
                           method: Any = None) -> Any:
    """The abstract `params` collection of `model.init(key, *inputs, method=method)` (see
    `abstract_params`)."""
    def init(*xs):
        return model.init(jax.random.PRNGKey(0), *xs, method=method)["params"]
    return abstract_params(init, *inputs, sharding=sharding)


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly abstract or boxed) parameter tree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def init_params_on_host(model: nn.Module, seed: int, *init_args: Any, **init_kwargs: Any) -> Any:
    """Parameters for `model` drawn with NumPy on the host, without compiling `model.init`.

    Same distributions as the layer initialisers (kernels: normal with variance 1/fan_in, fan_in =
    every axis but the last; biases and `null_condition`: 0; norm scales: 1). XLA:CPU needs minutes
    to compile `jit(model.init)` of the 7-level UNet (one threefry kernel per tensor), while this
    takes milliseconds; use `sharding.sharded_init` on accelerators, where that compile is cheap.
    Returns the plain (unboxed) `{"params": ...}` tree.
    """
    abstract = abstract_params(functools.partial(model.init, **init_kwargs), jax.random.PRNGKey(0),
                               *init_args)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path_parts(path)[-1]
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            values = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        elif name == "scale":
            values = np.ones(leaf.shape)
        else:
            values = np.zeros(leaf.shape)
        return jnp.asarray(values, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)
