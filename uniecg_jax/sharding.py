"""Device mesh, the one logical-axis rules table, and sharded initialisation.

Every parameter and major activation carries logical axis names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`). `LOGICAL_AXIS_RULES` maps them onto the mesh axes
(`data`, `fsdp`, `tensor`). Parameters are initialised abstractly (`jax.eval_shape`), their
shardings derived from the rules, and only then materialised by `jax.jit(init, out_shardings=...)`,
so a 7B model never exists unsharded on one device.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uniecg_jax.errors import ConfigError
from uniecg_jax.layers.params import abstract_params

MESH_AXES = ("data", "fsdp", "tensor")

# The single source of truth for how logical axes map onto mesh axes. A logical axis absent from the
# table is replicated. Batch shards over data *and* fsdp (FSDP = data parallel with sharded weights);
# weights shard their embed dimension over fsdp and their head/mlp/vocab dimension over tensor.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("conv_window", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves (data, fsdp, tensor) degrees; one of them may be -1 = "all remaining devices".

    Raises ConfigError (a ValueError) naming the `mesh` fields when they do not fit the devices."""
    degrees = [int(mesh_config[axis]) for axis in MESH_AXES]
    unknown = [i for i, d in enumerate(degrees) if d == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, degrees))}")
    known = math.prod(d for d in degrees if d != -1)
    if any(d == 0 or d < -1 for d in degrees):
        raise ConfigError(f"mesh: degrees must be positive or -1, got {dict(zip(MESH_AXES, degrees))}")
    if unknown:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed degrees "
                             f"{dict(zip(MESH_AXES, degrees))}")
        degrees[unknown[0]] = num_devices // known
    if math.prod(degrees) != num_devices:
        raise ConfigError(f"mesh: {dict(zip(MESH_AXES, degrees))} needs {math.prod(degrees)} devices, "
                         f"{num_devices} available")
    return tuple(degrees)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh described by `mesh_config` over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    try:
        device_grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU / odd topologies: a plain reshape is the best layout there is.
        device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES)


def _mesh_axes_size(mesh: Mesh, mesh_axes: Any) -> int:
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
    return math.prod(mesh.shape[a] for a in mesh_axes)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec with the rules table.

    When `shape` and `mesh` are given, a dimension whose size is not divisible by its mesh axes is
    replicated instead (e.g. 2 KV heads on a tensor axis of 4), and a mesh axis is used at most once.
    """
    rule_map = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        mesh_axes = rule_map.get(name) if name is not None else None
        if mesh_axes is not None:
            axes_tuple = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            axes_tuple = tuple(a for a in axes_tuple if a not in used)
            if mesh is not None:
                axes_tuple = tuple(a for a in axes_tuple if mesh.shape[a] > 1)
            if shape is not None and mesh is not None and axes_tuple:
                if shape[dim] % _mesh_axes_size(mesh, axes_tuple):
                    axes_tuple = ()
            used.update(axes_tuple)
            mesh_axes = (axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple) or None
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def logical_axes_tree(boxed_tree: Any) -> Any:
    """Tree of logical-axis tuples (or None for unannotated leaves) from a boxed param tree."""
    return jax.tree.map(lambda x: x.names if _is_partitioned(x) else None, boxed_tree,
                        is_leaf=_is_partitioned)


def shardings_for(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of a (possibly abstract) tree boxed with `nn.Partitioned`.

    Unannotated leaves (e.g. optimizer step counters) are replicated.
    """
    def leaf_sharding(x):
        if _is_partitioned(x):
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(leaf_sharding, boxed_tree, is_leaf=_is_partitioned)


def abstract_sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *init_args: Any
                          ) -> tuple[Any, Any]:
    """Abstract initialisation: `eval_shape(init_fn)` -> shardings, without allocating anything.

    Returns:
      (abstract_params, shardings): unboxed `jax.ShapeDtypeStruct`s carrying `.sharding`, and the
      matching tree of NamedShardings.
    """
    abstract = abstract_params(init_fn, *init_args,
                               sharding=lambda boxed: shardings_for(boxed, mesh))
    return abstract, jax.tree.map(lambda leaf: leaf.sharding, abstract)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *init_args: Any) -> tuple[Any, Any]:
    """Initialises parameters directly onto their shardings: `jit(init, out_shardings=...)`.

    `init_fn(*init_args)` returns a boxed tree (flax `init` output). Returns unboxed params and their
    shardings.
    """
    _, shardings = abstract_sharded_init(init_fn, mesh, *init_args)
    with mesh_context(mesh):
        params = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*init_args)
    return params, shardings


def abstract_sharded_params(model: nn.Module, mesh: Mesh, *init_args: Any,
                            collection: str = "params") -> Any:
    """Abstract `params` of a Flax model: ShapeDtypeStructs with shardings (for restore/import)."""
    def init_fn(*args):
        return model.init(jax.random.PRNGKey(0), *args)[collection]
    abstract, _ = abstract_sharded_init(init_fn, mesh, *init_args)
    return abstract


def logical_rules_context(mesh: Mesh):
    """Context in which `nn.with_logical_constraint` resolves activation names with our rules."""
    return nn.logical_axis_rules(LOGICAL_AXIS_RULES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """Makes `mesh` current and installs the rules table, for tracing sharded code.

    `jax.set_mesh` (not the deprecated `with mesh:`, under which `with_sharding_constraint` with a
    bare PartitionSpec is silently ignored in this JAX) plus `nn.logical_axis_rules`, so
    `nn.with_logical_constraint` on activations really constrains them.
    """
    set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh")
    with set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh` (scalars, step counters, rng keys)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for every leaf of a batch: leading (batch) dim over (data, fsdp), rest replicated.

    A PartitionSpec shorter than an array's rank replicates the trailing dims, so this one sharding
    serves arrays of any rank >= 1 as an `in_shardings` prefix for a whole batch pytree.
    """
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be divisible by this (the data x fsdp degree)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch_from_host(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles each host's slice of the batch into global arrays sharded over (data, fsdp).

    On one host this is a sharded `device_put`; on a pod each host passes only its rows
    (`jax.make_array_from_process_local_data`), so no host ever holds the global batch.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for a batch-leading array: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


class HostDataParallel:
    """Data parallelism over this host's devices for inference jobs: params replicated on them once
    (for the latest params object), batches `[B, ...]` sharded along B. A batch whose B does not divide
    by the device count (or a one-device host) stays on the default device."""

    def __init__(self, devices: Sequence[jax.Device] | None = None):
        self.devices = list(devices or jax.local_devices())
        mesh = Mesh(np.asarray(self.devices), ("batch",))
        self._batch = NamedSharding(mesh, PartitionSpec("batch"))
        self._everywhere = NamedSharding(mesh, PartitionSpec())
        self._replicated: tuple[Any, Any] | None = None   # (params, their replicated copy)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def place(self, params: Any, batch: int) -> tuple[Any, Callable[[Any], Any]]:
        """(params, put) for a batch of `batch` rows: `put(array)` places one batch array."""
        if self.num_devices == 1 or batch % self.num_devices:
            return params, jax.numpy.asarray
        if self._replicated is None or self._replicated[0] is not params:
            self._replicated = (params, jax.device_put(params, self._everywhere))
        return self._replicated[1], lambda x: jax.device_put(np.asarray(x), self._batch)


def maybe_initialize_distributed(enabled: bool) -> None:
    """`jax.distributed.initialize()` on multi-host pods; a no-op on one host (flag off)."""
    if enabled:
        jax.distributed.initialize()
