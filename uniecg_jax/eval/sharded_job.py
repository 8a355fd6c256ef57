"""The machinery every sharded, resumable per-record evaluation job shares (`eval interpret`,
`eval generate`).

Records are spread over hosts in blocks: block j of `block` consecutive records (in the job's fixed
record order) goes to host `j % process_count`, so no one splits files by hand. A host processes its
records in fixed batches of `batch_size` and appends one JSON line per record to its own part file
`OUT.part-{i}-of-{n}`, flushing and fsyncing after every batch. Rerunning the same command resumes: the
rows already in the part file are kept, a torn last line (a kill mid-write) is dropped, and a batch
with any missing row is recomputed whole (so seeded work such as sampling gives the same rows as an
uninterrupted run) while only its missing rows are written. A host that finishes writes
`PART.done`; `read_parts` returns the rows of all hosts once every part is done, each record exactly
once, in the job's record order, for the job's merge step (set-level metrics).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
from jax.experimental import multihost_utils
from tqdm import tqdm

from uniecg_jax.errors import UniECGError


def part_path(out: str, process_index: int, process_count: int) -> str:
    """The part file of host `process_index` of `process_count` for the job writing `out`."""
    return f"{out}.part-{process_index}-of-{process_count}"


def read_part(path: str) -> dict[str, dict]:
    """Finished rows of a part file by record id; drops (and truncates) a torn last line."""
    rows: dict[str, dict] = {}
    if not os.path.exists(path):
        return rows
    good_bytes = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                break
            rows[row["record_id"]] = row
            good_bytes += len(line)
    if good_bytes != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return rows


def host_indices(count: int, process_index: int, process_count: int, block: int = 1) -> list[int]:
    """Indices (into the job's record list of length `count`) that host `process_index` owns:
    blocks of `block` consecutive records, block j on host j % process_count."""
    if not 0 <= process_index < process_count:
        raise UniECGError(f"host index {process_index} is outside 0..{process_count - 1}")
    if block < 1:
        raise UniECGError(f"block must be >= 1, got {block}")
    return [i for i in range(count) if (i // block) % process_count == process_index]


def run_shard(record_ids: Sequence[str], process_batch: Callable[[list[int]], list[dict]],
              out: str, *, process_index: int, process_count: int, batch_size: int,
              block: int = 1, settings: dict | None = None, desc: str = "eval",
              progress: bool = True) -> str:
    """Runs this host's share of a job into its part file; returns the part path.

    Args:
      record_ids: the job's records, in its fixed order (unique ids).
      process_batch: indices of one batch (into `record_ids`) -> one JSON-serialisable row per
        index (the `record_id` key is added here).
      batch_size: records per batch (fixed boundaries over this host's indices).
      block: records per host-assignment block (1 = round robin over records).
      settings: the job's options (JSON); a resume with other settings is an error, since its rows
        would mix two jobs.
    """
    if len(set(record_ids)) != len(record_ids):
        raise UniECGError(f"{out}: the evaluation records have duplicate ids")
    mine = host_indices(len(record_ids), process_index, process_count, block)
    batches = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    path = part_path(out, process_index, process_count)
    check_settings(path, dict(settings or {}, hosts=process_count, records=len(record_ids)))
    done = read_part(path)
    todo = [batch for batch in batches if any(record_ids[i] not in done for i in batch)]
    finished = sum(record_ids[i] in done for i in mine)
    with open(path, "a") as f, tqdm(total=len(mine), initial=finished, disable=not progress,
                                    desc=f"{desc} host {process_index}") as bar:
        for batch in todo:
            rows = process_batch(batch)
            if len(rows) != len(batch):
                raise ValueError(f"{len(rows)} rows for a batch of {len(batch)} records")
            missing = [(i, row) for i, row in zip(batch, rows) if record_ids[i] not in done]
            for i, row in missing:
                f.write(json.dumps({"record_id": record_ids[i], **row}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(missing))
    with open(path + ".done", "w") as f:
        f.write(str(len(mine)))
    return path


def check_settings(path: str, settings: dict) -> None:
    """Records `settings` beside part `path` (PATH.job.json), or checks a resumed part's."""
    settings = json.loads(json.dumps(settings))   # the JSON form, as a stored copy reads back
    stored_path = path + ".job.json"
    if os.path.exists(stored_path) and os.path.exists(path):
        with open(stored_path) as f:
            stored = json.load(f)
        if stored != settings:
            changed = sorted(k for k in set(stored) | set(settings)
                             if stored.get(k) != settings.get(k))
            raise UniECGError(f"{path} was written with other settings ({', '.join(changed)}: "
                              f"{[stored.get(k) for k in changed]} then, "
                              f"{[settings.get(k) for k in changed]} now); use another --out or "
                              "delete the part files")
    with open(stored_path, "w") as f:
        json.dump(settings, f)


def read_parts(out: str, process_count: int, record_ids: Sequence[str]) -> list[dict] | None:
    """Rows of every part, in `record_ids` order, once all parts are done (else None). A record in
    two parts, or missing from complete parts, is an error naming the file."""
    parts = [part_path(out, i, process_count) for i in range(process_count)]
    if not all(os.path.exists(p + ".done") for p in parts):
        return None
    rows: dict[str, dict] = {}
    for part in parts:
        for record_id, row in read_part(part).items():
            if record_id in rows:
                raise UniECGError(f"{part}: record {record_id} also appears in another part")
            rows[record_id] = row
    missing = [record_id for record_id in record_ids if record_id not in rows]
    if missing:
        raise UniECGError(f"{out}: parts are complete but {len(missing)} records are missing, "
                          f"e.g. {missing[:3]}")
    return [rows[record_id] for record_id in record_ids]


def resolve_hosts(host_index: int | None, host_count: int | None) -> tuple[int, int, bool]:
    """(this host, host count, manual) from --host-index/--host-count, defaulting to JAX's
    `process_index` / `process_count`; manual = hosts run by hand (no JAX barrier)."""
    host = jax.process_index() if host_index is None else host_index
    hosts = jax.process_count() if host_count is None else host_count
    if not 0 <= host < hosts:
        raise UniECGError(f"--host-index {host} is outside 0..{hosts - 1}")
    return host, hosts, host_count is not None


def wait_for_hosts(hosts: int, manual: bool, what: str) -> None:
    """Barrier across JAX processes (a no-op on one host or for hosts run by hand)."""
    if hosts > 1 and not manual:
        multihost_utils.sync_global_devices(what)


def should_merge(host: int, manual: bool) -> bool:
    """Host 0 merges a JAX multi-host job; with hosts run by hand every host tries (the last to
    finish succeeds)."""
    return host == 0 or manual
