"""Ahead-of-time compile targets: Cloud TPU slices, compiled for on any CPU host through libtpu.

`uniecg dry-run --topology v5p-64` compiles the real train step for the chips of that slice without
one attached (MaxText's `train_compile.py` and axlearn's `run_aot_compilation` do the same):
`jax.experimental.topologies.get_topology_desc` asks libtpu for compile-only devices of the
topology, the mesh is built over them, and `jit(...).lower(...).compile()` runs the TPU compiler,
whose `memory_analysis()` is the plan the chip would run (remat, fusion and layouts included),
unlike the simulated-CPU compile.

Slice names follow Cloud TPU: `v5e-N` / `v5litepod-N` / `v6e-N` count chips (one device per chip,
2-D tori); `v4-N` / `v5p-N` count TensorCores, two per chip, and JAX sees one megacore device per
chip (3-D tori). Explicit libtpu topology strings (`v5e:2x2`, `v5p:2x4x4`, `v4:2x2x1`) pass
through, for layouts the table below does not name.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from jax.experimental import topologies

from uniecg_jax.errors import UniECGError

GIB = 2 ** 30

# Per generation: libtpu's topology prefix, chip config, dimensions of the torus, HBM per device
# (Cloud TPU documentation: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB per chip).
_GENERATIONS = {
    "v4": dict(prefix="v4", chip_config="megacore", dims=3, cores_per_chip=2, hbm_gib=32),
    "v5p": dict(prefix="v5p", chip_config="megacore", dims=3, cores_per_chip=2, hbm_gib=95),
    "v5e": dict(prefix="v5e", chip_config="default", dims=2, cores_per_chip=1, hbm_gib=16),
    "v6e": dict(prefix="v6e", chip_config="default", dims=2, cores_per_chip=1, hbm_gib=32),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6lite": "v6e"}
# Chip counts -> torus shapes of the standard slices (Cloud TPU "TPU versions" pages).
_LAYOUT_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_LAYOUT_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU slice to compile for.

    Attributes:
      name: what the user typed (`v5p-64`, `v5e:2x2`).
      topology: libtpu's topology string (`v5p:2x4x4`).
      chip_config: libtpu's chip config (`megacore` for v4/v5p: one device per chip).
      num_devices: JAX devices in the slice (chips).
      hbm_bytes: HBM of one device.
    """
    name: str
    topology: str
    chip_config: str
    num_devices: int
    hbm_bytes: int


def resolve_target(name: str) -> TpuTarget:
    """`v5p-64` / `v5e-8` / `v5litepod-16` / `v4-8` / `v6e-4` or `v5e:2x2` -> a TpuTarget.

    Raises UniECGError naming the accepted forms when `name` is neither."""
    text = name.strip().lower()
    explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    sliced = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    generation = None
    if explicit or sliced:
        family = (explicit or sliced).group(1)
        generation = _GENERATIONS.get(_ALIASES.get(family, family))
    if generation is None:
        raise UniECGError(
            f"--topology {name!r}: expected a Cloud TPU slice name ({', '.join(_examples())}) or a "
            f"libtpu topology (v5e:2x2, v5p:2x4x4, v4:2x2x1); generations: {sorted(_GENERATIONS)}")
    if explicit:
        shape = explicit.group(2)
        if shape.count("x") + 1 != generation["dims"]:
            raise UniECGError(f"--topology {name!r}: {generation['prefix']} slices are "
                              f"{generation['dims']}-D tori (e.g. {_examples(generation)[0]})")
    else:
        count = int(sliced.group(2))
        chips, remainder = divmod(count, generation["cores_per_chip"])
        layouts = _LAYOUT_3D if generation["dims"] == 3 else _LAYOUT_2D
        if remainder or chips not in layouts:
            raise UniECGError(
                f"--topology {name!r}: no standard {generation['prefix']} slice of {count} "
                f"{'cores' if generation['cores_per_chip'] > 1 else 'chips'}; pass the torus "
                f"explicitly, e.g. {generation['prefix']}:{next(iter(layouts.values()))}")
        shape = layouts[chips]
    num_devices = 1
    for size in shape.split("x"):
        num_devices *= int(size)
    return TpuTarget(name=name, topology=f"{generation['prefix']}:{shape}",
                     chip_config=generation["chip_config"], num_devices=num_devices,
                     hbm_bytes=generation["hbm_gib"] * GIB)


def _examples(generation=None) -> list[str]:
    names = {"v5e": "v5e-8", "v5p": "v5p-64", "v4": "v4-8", "v6e": "v6e-4"}
    if generation is not None:
        return [names[generation["prefix"]]]
    return list(names.values())


def libtpu_available() -> bool:
    """True when the `libtpu` package (the `tpu` extra) is importable."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(target: TpuTarget) -> list:
    """Compile-only JAX devices of `target` (no TPU needed; libtpu must be installed).

    Raises UniECGError when libtpu is missing or rejects the topology."""
    if not libtpu_available():
        raise UniECGError(f"--topology {target.name}: compiling for a TPU slice needs libtpu: "
                          "pip install -e '.[tpu]'")
    # Compile-only: no chip is opened, so a second process (a training run holding
    # /tmp/libtpu_lockfile on a TPU VM) must not make libtpu refuse to load.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not _has_local_tpu():
        # Off a TPU VM libtpu asks the (absent) metadata server for the host's accelerator type
        # and worker names and logs two errors that read like failures; naming them here keeps a
        # dry run's output to the report. Compile-only devices come from the topology either way.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(target))
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config)
    except Exception as e:  # libtpu's own message says what is wrong with the topology
        raise UniECGError(f"--topology {target.name} ({target.topology}): libtpu cannot build "
                          f"it: {str(e).splitlines()[0]}") from None
    devices = list(description.devices)
    if len(devices) != target.num_devices:
        raise UniECGError(f"--topology {target.name}: libtpu gave {len(devices)} devices for "
                          f"{target.topology}, expected {target.num_devices}")
    return devices


def _has_local_tpu() -> bool:
    """TPU chips attached to this host (Cloud TPU VMs expose /dev/accel* or /dev/vfio)."""
    return any(os.path.exists(path) for path in ("/dev/accel0", "/dev/vfio/0"))


def accelerator_type(target: TpuTarget) -> str:
    """Cloud TPU's accelerator type of `target` (`v5litepod-4`, `v5p-8`): chips for v5e / v6e,
    TensorCores for v4 / v5p."""
    generation = target.topology.split(":")[0]
    cores = target.num_devices * _GENERATIONS[generation]["cores_per_chip"]
    return f"{'v5litepod' if generation == 'v5e' else generation}-{cores}"
