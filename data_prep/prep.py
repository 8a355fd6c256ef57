"""`uniecg prep`: a dataset root -> ArrayRecord shards split by patient.

Output folder:
  {split}-{i:05d}-of-{n:05d}.array_record   msgpack examples (uniecg_jax.data.examples)
  {shard}.meta.json                         per-shard counts and skipped records (marks it finished)
  summary.json                              counts per split, shard list, text encoder, options
  skipped.jsonl                             every skipped record and why

Shards are planned up front from the sorted item list, so a rerun after a kill produces the same
shards: finished ones (data + meta present) are skipped, a half-written one (only a `.tmp`) is redone.
Each shard is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time

from array_record.python.array_record_module import ArrayRecordWriter

from tqdm import tqdm

from data_prep.sources import SourceOptions, WorkItem, list_items, load_item
from uniecg_jax.data.examples import encode_example
from uniecg_jax.data.prompts import report_text
from uniecg_jax.data.record import short_record_warning
from uniecg_jax.data.splits import DEFAULT_FRACTIONS, SPLITS, check_fractions, patient_split
from uniecg_jax.data.text_encoder import (PrecomputedEmbeddings, check_text_encoder_name,
                                          get_text_encoder)
from uniecg_jax.errors import RecordError, UniECGError

SUMMARY_JSON, SKIPPED_JSONL = "summary.json", "skipped.jsonl"


@dataclasses.dataclass(frozen=True)
class PrepOptions:
    source: SourceOptions
    out_dir: str
    workers: int = 2
    shard_size: int = 1000
    text_encoder: str = "minilm"        # minilm | hash[:D] | precomputed:FILE.npz | none
    prompt_template: str = "plain"      # plain | diffusets
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    count: int
    items: tuple[WorkItem, ...]

    @property
    def file(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}.array_record"


def plan_shards(items: list[WorkItem], shard_size: int,
                fractions: tuple[float, float, float]) -> list[ShardPlan]:
    by_split: dict[str, list[WorkItem]] = {split: [] for split in SPLITS}
    for item in items:
        by_split[patient_split(item.patient_id, fractions)].append(item)
    plans = []
    for split, split_items in by_split.items():
        count = max(1, -(-len(split_items) // shard_size)) if split_items else 0
        for index in range(count):
            chunk = split_items[index * shard_size:(index + 1) * shard_size]
            plans.append(ShardPlan(split, index, count, tuple(chunk)))
    return plans


_WORKER_ENCODER: dict[str, object] = {}


def _encoder(name: str):
    if name not in _WORKER_ENCODER:
        _WORKER_ENCODER[name] = get_text_encoder(name)
    return _WORKER_ENCODER[name]


def _embed(options: PrepOptions, records, skipped) -> list:
    """Text embeddings for the loaded records; a record whose precomputed embedding is missing is
    moved to `skipped`. Returns [(record, conversation, embedding or None)]."""
    encoder = _encoder(options.text_encoder)
    if encoder is None:
        return [(r, c, None) for r, c in records]
    if isinstance(encoder, PrecomputedEmbeddings):
        out = []
        for record, conversation in records:
            key = record.record_id if encoder.has(record.record_id) else record.report
            if not encoder.has(key):
                skipped.append({"record": record.record_id, "reason": f"{encoder.path}: no "
                                "precomputed embedding for its record id or report"})
                continue
            out.append((record, conversation, encoder.lookup([key])[0]))
        return out
    texts = [report_text(r.report, r.labels, options.prompt_template) for r, _ in records]
    embeddings = encoder.encode(texts) if texts else []
    return [(r, c, e) for (r, c), e in zip(records, embeddings)]


def write_shard(options: PrepOptions, plan: ShardPlan) -> dict:
    """Reads, embeds and writes one shard (temp name, then rename). Returns its meta dict."""
    records, skipped = [], []
    for item in plan.items:
        try:
            records.append(load_item(options.source, item))
        except RecordError as e:
            skipped.append({"record": item.key, "reason": str(e)})
    embedded = _embed(options, records, skipped)
    final = os.path.join(options.out_dir, plan.file)
    temporary = final + ".tmp"
    writer = ArrayRecordWriter(temporary, "group_size:1")
    for record, conversation, embedding in embedded:
        writer.write(encode_example(record, embedding, conversation))
    writer.close()
    meta = dict(file=plan.file, split=plan.split, index=plan.index, num_records=len(embedded),
                record_ids=[r.record_id for r, _, _ in embedded],
                patient_ids=sorted({r.patient_id for r, _, _ in embedded}),
                num_short=sum(short_record_warning(r) is not None for r, _, _ in embedded),
                embedding_dim=int(len(embedded[0][2])) if embedded and embedded[0][2] is not None
                else 0, skipped=[dict(s, shard=plan.file) for s in skipped])
    with open(final + ".meta.json.tmp", "w") as f:
        json.dump(meta, f)
    os.replace(temporary, final)
    os.replace(final + ".meta.json.tmp", final + ".meta.json")
    return meta


def _shard_done(out_dir: str, plan: ShardPlan) -> bool:
    final = os.path.join(out_dir, plan.file)
    return os.path.exists(final) and os.path.exists(final + ".meta.json")


def _write_shard_job(args):
    options, plan = args
    return write_shard(options, plan)


def _import_before_fork() -> None:
    """Forked workers inherit imported modules: import the slow ones (neurokit2 ~1-2 s) once here."""
    import neurokit2  # noqa: F401
    import scipy.signal  # noqa: F401
    import wfdb  # noqa: F401


def run_prep(options: PrepOptions) -> dict:
    """Prepares (or finishes preparing) `options.out_dir`; returns the summary dict."""
    check_text_encoder_name(options.text_encoder)
    started = time.time()
    os.makedirs(options.out_dir, exist_ok=True)
    items, listing_skipped = list_items(options.source)
    plans = plan_shards(items, options.shard_size, options.split_fractions)
    pending = [p for p in plans if not _shard_done(options.out_dir, p)]
    progress = tqdm(total=sum(len(p.items) for p in plans), unit="rec", desc="prep",
                    disable=not options.progress, file=sys.stderr)
    progress.update(sum(len(p.items) for p in plans) - sum(len(p.items) for p in pending))
    jobs = [(options, plan) for plan in pending]
    if options.workers > 1 and len(jobs) > 1:
        _import_before_fork()
        context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        with context.Pool(min(options.workers, len(jobs))) as pool:
            for meta in pool.imap_unordered(_write_shard_job, jobs):
                progress and progress.update(meta["num_records"] + len(meta["skipped"]))
    else:
        for job in jobs:
            meta = _write_shard_job(job)
            progress and progress.update(meta["num_records"] + len(meta["skipped"]))
    progress and progress.close()
    return write_summary(options, plans, listing_skipped, time.time() - started)


def write_summary(options: PrepOptions, plans: list[ShardPlan], listing_skipped: list[dict],
                  seconds: float) -> dict:
    metas = []
    for plan in plans:
        with open(os.path.join(options.out_dir, plan.file + ".meta.json")) as f:
            metas.append(json.load(f))
    skipped = list(listing_skipped) + [s for meta in metas for s in meta["skipped"]]
    with open(os.path.join(options.out_dir, SKIPPED_JSONL), "w") as f:
        for entry in skipped:
            f.write(json.dumps(entry) + "\n")
    counts = {split: sum(m["num_records"] for m in metas if m["split"] == split)
              for split in SPLITS}
    dims = {m["embedding_dim"] for m in metas if m["num_records"]}
    summary = dict(
        source=options.source.source, root=options.source.root,
        text_encoder=options.text_encoder, prompt_template=options.prompt_template,
        embedding_dim=max(dims) if dims else 0, split_fractions=list(options.split_fractions),
        num_records=counts, num_written=sum(counts.values()), num_skipped=len(skipped),
        num_short=sum(m.get("num_short", 0) for m in metas), min_seconds=options.source.min_seconds,
        num_shards={split: sum(1 for m in metas if m["split"] == split) for split in SPLITS},
        shards=[dict(file=m["file"], split=m["split"], num_records=m["num_records"])
                for m in metas],
        seconds_this_run=round(seconds, 3))
    with open(os.path.join(options.out_dir, SUMMARY_JSON), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def options_from_args(args) -> PrepOptions:
    try:
        fractions = check_fractions(args.split.split(","))
    except UniECGError:
        raise UniECGError(f"--split {args.split!r}: need three fractions summing to 1") from None
    source = SourceOptions(source=args.source, root=args.root, missing_leads=args.missing_leads,
                           num_records=args.num_records, seed=args.seed, ecg_root=args.ecg_root,
                           build_conversations=not args.no_conversations,
                           min_seconds=args.min_seconds)
    return PrepOptions(source=source, out_dir=args.out, workers=args.workers,
                       shard_size=args.shard_size, text_encoder=args.text_encoder,
                       prompt_template=args.prompt_template, split_fractions=fractions,
                       progress=not args.no_progress)


def handle(args) -> int:
    summary = run_prep(options_from_args(args))
    print(f"wrote {summary['num_written']} records ({summary['num_records']}) to {args.out}; "
          f"skipped {summary['num_skipped']} (see {SKIPPED_JSONL})")
    return 0
