"""Multi-host safetensors export: every host writes the slices of each tensor that it holds.

The HF format keeps each tensor whole in one file, so a tensor whose shards live on several hosts is
written cooperatively into one file: every host derives the same plan from the global shapes alone
(which file each tensor goes to, `max_shard_size` with Hugging Face's semantics, each tensor's byte
range), host 0 creates the files (safetensors header + a sparse data area of the final size), and
then each host writes, for every addressable shard it owns (`replica_id == 0`, so a replicated
tensor is written once), that block of the tensor at its offsets in the file (`os.pwrite`). Our
layout is turned into HF's per block on the device that holds it (layer pick, head merge,
transpose, dtype cast), so a host never holds more than one shard of one tensor: the whole tensor
at most, never the model. A tensor that is no block layout of one array (open_clip's fused
`in_proj_weight` joins three of our leaves) is a `HostTensor`: every host computes it when the
writer reaches it (gathering its leaves with `gather_to_host`, a collective), host 0 writes it, so
the bound is the same one tensor. Host 0 writes `model.safetensors.index.json` last. The output
directory must be one POSIX filesystem every host sees (a local disk for one host; NFS / Filestore /
Lustre on a pod).

    tensors = [ExportTensor("model.embed_tokens.weight", params["embedding"]), ...]
    write_safetensors(tensors, out_dir, max_shard_size="5GB")
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from uniecg_jax.errors import CheckpointError, UniECGError

# safetensors dtype names (safetensors/src/tensor.rs `Dtype`).
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL"}
_RAW_VIEW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# huggingface_hub `parse_size_to_int` (decimal units) plus transformers' binary KiB/MiB/GiB/TiB.
_SIZE_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a Hugging Face size string ("5GB" = 5e9, "500MB", "2GiB" = 2 * 2^30)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise UniECGError(f"max shard size {size!r}: expected a number of bytes or e.g. '5GB', "
                          "'500MB', '2GiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """How our array maps onto the written tensor.

    layer: take index `layer` of our axis 0 (one layer of a scanned `[L, ...]` stack), or None.
    permute: our (remaining) axes in the written order, before grouping (torch's Conv2d weight
      [out, in, kh, kw] from a Flax kernel [kh, kw, in, out] is (3, 2, 0, 1)), or None.
    groups: for each written axis, the (remaining) axes of ours merged into it, in order; None keeps
      our axes. A block is writable when every merged axis but the first is whole in it (head_dim
      and the like are never sharded).
    transpose: the written tensor is the transpose of the 2-D merged array (nn.Linear's [out, in]).
    """
    layer: int | None = None
    groups: tuple[tuple[int, ...], ...] | None = None
    transpose: bool = False
    permute: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class HostTensor:
    """A written tensor computed on the host when the writer reaches it, for layouts that are no
    block of one array. `compute()` runs on EVERY host in plan order (it may gather sharded leaves:
    `gather_to_host` is a collective) and returns the whole tensor [shape]; host 0 writes it."""
    shape: tuple[int, ...]
    dtype: Any
    compute: Callable[[], np.ndarray]


def gather_to_host(array: Any) -> np.ndarray:
    """The whole of a (possibly multi-host sharded) array on this host; a collective when it spans
    other hosts, so every host must call it for the same arrays in the same order."""
    if not isinstance(array, jax.Array):
        return np.asarray(array)
    if not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    # Assembled from the shards: `np.asarray(array)` would cache the host copy on the array,
    # keeping every gathered leaf of the model alive on the host.
    out = np.empty(array.shape, array.dtype)
    for shard in array.addressable_shards:
        if shard.replica_id == 0:
            out[shard.index] = np.asarray(shard.data)
    return out


@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One written tensor: its name, our (possibly multi-host sharded) array, the layout hook and
    the written dtype (None = the array's)."""
    name: str
    array: Any
    layout: TensorLayout = TensorLayout()
    dtype: Any = None

    @property
    def source_shape(self) -> tuple[int, ...]:
        shape = tuple(self.array.shape)
        return shape[1:] if self.layout.layer is not None else shape

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.source_shape
        if self.layout.permute is not None:
            shape = tuple(shape[axis] for axis in self.layout.permute)
        groups = self.layout.groups or tuple((axis,) for axis in range(len(shape)))
        merged = tuple(math.prod(shape[axis] for axis in group) for group in groups)
        return merged[::-1] if self.layout.transpose else merged

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype if self.dtype is not None else self.array.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize


@dataclasses.dataclass
class FilePlan:
    """One safetensors file: its tensors with their byte ranges in the data area, and its header."""
    filename: str
    tensors: list[ExportTensor]
    offsets: list[tuple[int, int]]
    header: bytes

    @property
    def data_size(self) -> int:
        return self.offsets[-1][1] if self.offsets else 0


def _header(tensors: Sequence[ExportTensor], offsets: Sequence[tuple[int, int]],
            metadata: dict[str, str] | None) -> bytes:
    """The safetensors header: u64 little-endian JSON length, then the JSON padded with spaces to
    a multiple of 8 bytes (as the safetensors library writes it)."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    for tensor, (begin, end) in zip(tensors, offsets):
        name = tensor.np_dtype.name
        if name not in SAFETENSORS_DTYPES:
            raise UniECGError(f"{tensor.name}: dtype {name} has no safetensors encoding")
        entries[tensor.name] = {"dtype": SAFETENSORS_DTYPES[name], "shape": list(tensor.shape),
                                "data_offsets": [begin, end]}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def plan_files(tensors: Sequence[ExportTensor], prefix: str = "model",
               max_shard_size: int | str | None = "5GB",
               metadata: dict[str, str] | None = None) -> list[FilePlan]:
    """Groups `tensors` (in order) into files like `huggingface_hub.split_torch_state_dict_into_
    shards`: a new file when the next tensor would take the current one past `max_shard_size`, a
    tensor larger than that alone in its own file; None = one file. Names: `{prefix}.safetensors`
    for one file, else `{prefix}-00001-of-0000N.safetensors`. Every host computes the same plan."""
    names = [tensor.name for tensor in tensors]
    if len(set(names)) != len(names):
        raise UniECGError(f"duplicate tensor names in the export: "
                          f"{sorted({n for n in names if names.count(n) > 1})[:4]}")
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    groups: list[list[ExportTensor]] = []
    current: list[ExportTensor] = []
    size = 0
    for tensor in tensors:
        if limit is not None and tensor.nbytes > limit:
            groups.append([tensor])
            continue
        if limit is not None and current and size + tensor.nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current or not groups:
        groups.append(current)
    plans = []
    for k, group in enumerate(groups):
        filename = (f"{prefix}.safetensors" if len(groups) == 1
                    else f"{prefix}-{k + 1:05d}-of-{len(groups):05d}.safetensors")
        offsets, position = [], 0
        for tensor in group:
            offsets.append((position, position + tensor.nbytes))
            position += tensor.nbytes
        plans.append(FilePlan(filename, group, offsets, _header(group, offsets, metadata)))
    return plans


def index_name(prefix: str = "model") -> str:
    return f"{prefix}.safetensors.index.json"


def create_files(plans: Sequence[FilePlan], out_dir: str, prefix: str = "model") -> None:
    """Host 0: removes this prefix's stale files, then writes each file's header and sizes its
    data area (sparse, zero-filled until the hosts write their blocks)."""
    os.makedirs(out_dir, exist_ok=True)
    stale = re.compile(rf"{re.escape(prefix)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?$")
    for name in os.listdir(out_dir):
        if stale.fullmatch(name):
            os.remove(os.path.join(out_dir, name))
    for plan in plans:
        with open(os.path.join(out_dir, plan.filename), "wb") as f:
            f.write(plan.header)
            f.truncate(len(plan.header) + plan.data_size)


def _block(tensor: ExportTensor, index: tuple[slice, ...], data: Any
           ) -> tuple[tuple[tuple[int, int], ...], Callable[[], np.ndarray]] | None:
    """(the block's (start, stop) per written axis, a thunk giving the block in the written layout
    and dtype on the host) for one shard of our array at global `index`, or None when the shard
    holds none of the tensor (another layer)."""
    shape = tuple(tensor.array.shape)
    ranges = [(s.start or 0, shape[a] if s.stop is None else s.stop) for a, s in enumerate(index)]
    ranges += [(0, size) for size in shape[len(ranges):]]
    layout = tensor.layout
    pick = None
    if layout.layer is not None:
        start, stop = ranges[0]
        if not start <= layout.layer < stop:
            return None
        pick, ranges, shape = layout.layer - start, ranges[1:], shape[1:]
    if layout.permute is not None:
        ranges = [ranges[axis] for axis in layout.permute]
        shape = tuple(shape[axis] for axis in layout.permute)
    groups = layout.groups or tuple((axis,) for axis in range(len(shape)))
    merged = []
    for group in groups:
        first, rest = group[0], group[1:]
        if any(ranges[axis] != (0, shape[axis]) for axis in rest):
            raise CheckpointError(f"{tensor.name}: a shard splits axis {rest} of {shape}, which "
                                  "the written layout merges; reshard that axis whole first")
        inner = math.prod(shape[axis] for axis in rest)
        merged.append((ranges[first][0] * inner, ranges[first][1] * inner))
    block_shape = tuple(stop - start for start, stop in merged)
    if layout.transpose:
        merged = merged[::-1]

    def host_block() -> np.ndarray:
        # On the shard's device: the written layout and dtype, so the host gets one copy.
        x = jnp.asarray(data) if not isinstance(data, np.ndarray) else data
        if pick is not None:
            x = x[pick]
        if layout.permute is not None:
            x = x.transpose(layout.permute)
        x = x.reshape(block_shape)
        if layout.transpose:
            x = x.T
        if isinstance(x, np.ndarray):   # already the host's (a HostTensor, a host array)
            return np.ascontiguousarray(x.astype(tensor.np_dtype, copy=False))
        # One explicit host copy (on CPU backends np.asarray could alias the device buffer; a
        # copy keeps the bound the same on every backend and measurable by tracemalloc).
        return np.array(x.astype(tensor.np_dtype), copy=True, order="C")

    return tuple(merged), host_block


def _owned_shards(array: Any) -> list[tuple[tuple[slice, ...], Any]]:
    """(global index, data) of the shards this host writes: its addressable shards with replica id
    0 (each block of a replicated or partly replicated array is written by exactly one host); a
    `HostTensor` is computed on every host (its gathers are collectives), written by host 0."""
    if isinstance(array, HostTensor):
        value = np.asarray(array.compute())
        if tuple(value.shape) != tuple(array.shape):
            raise CheckpointError(f"a computed tensor has shape {tuple(value.shape)}, its plan "
                                  f"says {tuple(array.shape)}")
        if jax.process_index() != 0:
            return []
        return [(tuple(slice(None) for _ in value.shape), value)]
    if isinstance(array, jax.Array):
        return [(shard.index, shard.data) for shard in array.addressable_shards
                if shard.replica_id == 0]
    if jax.process_index() != 0:
        return []   # a host-local numpy array: host 0's copy is the one written
    return [(tuple(slice(None) for _ in np.shape(array)), np.asarray(array))]


def _pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
    """`os.pwrite` of a contiguous array's bytes without copying them, looping over partial
    writes (Linux writes at most ~2 GiB per call)."""
    view = memoryview(array).cast("B")
    while len(view):
        count = os.pwrite(fd, view, offset)
        view, offset = view[count:], offset + count


def _pwrite_block(fd: int, base: int, shape: tuple[int, ...], block: np.ndarray,
                  ranges: tuple[tuple[int, int], ...]) -> None:
    """Writes `block` (the `ranges` part of a row-major tensor of `shape` starting at byte `base`)
    as the fewest contiguous runs: the trailing axes the block covers whole form one run."""
    itemsize = block.dtype.itemsize
    raw = block.view(_RAW_VIEW[itemsize]) if block.ndim else block.reshape(1).view(
        _RAW_VIEW[itemsize])
    if not shape:
        _pwrite_all(fd, raw, base)
        return
    whole = len(shape)
    while whole > 0 and ranges[whole - 1] == (0, shape[whole - 1]):
        whole -= 1
    # Axes [0, split) are iterated; axes [split, ndim) are one contiguous run per index.
    split = max(whole - 1, 0)
    strides = [math.prod(shape[axis + 1:]) for axis in range(len(shape))]
    run_elements = math.prod(stop - start for start, stop in ranges[split:])
    outer = [range(start, stop) for start, stop in ranges[:split]]
    flat_raw = raw.reshape(-1)
    for k, outer_index in enumerate(np.ndindex(*[len(r) for r in outer]) if outer else [()]):
        element = sum((outer[a][i]) * strides[a] for a, i in enumerate(outer_index))
        element += sum(ranges[a][0] * strides[a] for a in range(split, len(shape)))
        chunk = flat_raw[k * run_elements:(k + 1) * run_elements]
        _pwrite_all(fd, chunk, base + element * itemsize)


def write_host_blocks(plans: Sequence[FilePlan], out_dir: str, progress: bool = True) -> int:
    """Every host: writes the blocks of every tensor that this host owns into the files host 0
    created; returns the bytes written. At most one block (one shard of one tensor) is on the host
    at a time."""
    written = 0
    total = sum(len(plan.tensors) for plan in plans)
    with tqdm(total=total, disable=not progress,
              desc=f"export host {jax.process_index()}") as bar:
        for plan in plans:
            fd = os.open(os.path.join(out_dir, plan.filename), os.O_WRONLY)
            try:
                for tensor, (begin, _) in zip(plan.tensors, plan.offsets):
                    base = len(plan.header) + begin
                    shards = _owned_shards(tensor.array)
                    while shards:
                        # Popped and dropped, so no block outlives its write (a host-computed
                        # tensor would otherwise stay alive while the next one is computed).
                        block = _block(tensor, *shards.pop())
                        if block is None:
                            continue
                        ranges, host_block = block
                        host = host_block()
                        _pwrite_block(fd, base, tensor.shape, host, ranges)
                        written += host.nbytes
                        del host, host_block, block
                    bar.update(1)
            finally:
                os.close(fd)
    return written


def write_index(plans: Sequence[FilePlan], out_dir: str, prefix: str = "model") -> str | None:
    """Host 0, after every host wrote: `{prefix}.safetensors.index.json` for a sharded export
    (HF's schema: metadata.total_size and the tensor -> file weight_map); None for one file."""
    if len(plans) == 1:
        return None
    weight_map = {tensor.name: plan.filename for plan in plans for tensor in plan.tensors}
    total = sum(plan.data_size for plan in plans)
    path = os.path.join(out_dir, index_name(prefix))
    with open(path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path


def _sync(what: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(what)


def write_safetensors(tensors: Sequence[ExportTensor], out_dir: str, *, prefix: str = "model",
                      max_shard_size: int | str | None = "5GB",
                      metadata: dict[str, str] | None = None, progress: bool = True) -> list[str]:
    """Writes `tensors` as safetensors files under `out_dir` from every JAX process at once (call it
    on all hosts); returns the file names (the index last when sharded). See the module docstring."""
    plans = plan_files(tensors, prefix, max_shard_size, metadata)
    if jax.process_index() == 0:
        create_files(plans, out_dir, prefix)
    _sync(f"safetensors export {out_dir}: files created")
    write_host_blocks(plans, out_dir, progress)
    _sync(f"safetensors export {out_dir}: blocks written")
    index = write_index(plans, out_dir, prefix) if jax.process_index() == 0 else None
    _sync(f"safetensors export {out_dir}: index written")
    del index
    return [plan.filename for plan in plans] + ([index_name(prefix)] if len(plans) > 1 else [])
