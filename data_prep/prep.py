"""`uniecg prep`: a dataset root -> ArrayRecord shards split by patient.

Output folder:
  {split}-{i:05d}-of-{n:05d}.array_record   msgpack examples (uniecg_jax.data.examples)
  {shard}.meta.json                         per-shard counts and skipped records (marks it finished)
  summary.json                              counts per split, shard list, text encoder, options
  skipped.jsonl                             every skipped record and why
  prep_options.json                         the options fingerprint (written first)

Shards are planned up front from the sorted item list, so a rerun after a kill produces the same
shards: finished ones (data + meta present) are skipped, a half-written one (only a `.tmp`) is redone.
Each shard is written to a temporary name and renamed when complete. A rerun with other options
(another text encoder, shard size, source...) is refused unless `overwrite`, which first removes the
old outputs; the runner and worker count are not options of the output (a local run can be finished
on Beam and the other way round).

Runners: `local` (a process pool on this machine) or Apache Beam (`data_prep/beam.py`: direct,
dataflow, flink, spark). Both call `write_shard` on the same plans, so they write the same bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import multiprocessing
import os
import shlex
import sys
import time

from array_record.python.array_record_module import ArrayRecordWriter

from tqdm import tqdm

from data_prep.arguments import RUNNERS
from data_prep.sources import SourceOptions, WorkItem, list_items, load_item
from uniecg_jax.data.examples import FORMAT_VERSION, encode_example
from uniecg_jax.data.prompts import report_text
from uniecg_jax.data.record import short_record_warning
from uniecg_jax.data.splits import DEFAULT_FRACTIONS, SPLITS, check_fractions, patient_split
from uniecg_jax.data.text_encoder import (CachedTextEncoder, MiniLMEncoder,
                                          PrecomputedEmbeddings, check_text_encoder_name,
                                          get_text_encoder)
from uniecg_jax.errors import RecordError, UniECGError

SUMMARY_JSON, SKIPPED_JSONL, FINGERPRINT_JSON = "summary.json", "skipped.jsonl", "prep_options.json"
# Version of what a shard holds beyond the example format (planning, QRS fields, skip rules): bump
# when a change makes old shards differ from what this code would write for the same options.
# 2: MiniLM embeds each report as if alone, padded to 16 tokens (it was one batch per shard padded
#    to its longest report: embeddings move in the last bits, <= 2e-7).
PREP_VERSION = 2


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
    overwrite: bool = False             # remove the outputs of a run with other options
    runner: str = "local"               # local | direct | dataflow | flink | spark (Beam)
    beam_args: tuple[str, ...] = ()     # Beam pipeline options, passed through unchanged


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
EMBEDDING_CACHE_BYTES = 64 << 20  # per worker process: ~43k MiniLM rows


def _encoder(name: str):
    """This process's text encoder `name`, loaded once; a model's embeddings are kept per distinct
    text (`CachedTextEncoder`) for every later shard the process writes."""
    if name not in _WORKER_ENCODER:
        encoder = get_text_encoder(name)
        if encoder is not None and not isinstance(encoder, PrecomputedEmbeddings):
            encoder = CachedTextEncoder(encoder, EMBEDDING_CACHE_BYTES)
        _WORKER_ENCODER[name] = encoder
    return _WORKER_ENCODER[name]


def reset_embedding_caches(max_bytes: int = EMBEDDING_CACHE_BYTES) -> None:
    """Empties this process's embedding caches, as in a fresh worker, and bounds them to
    `max_bytes` (0: no text reused across shards). For benchmarks; the bytes written never change."""
    for encoder in _WORKER_ENCODER.values():
        if isinstance(encoder, CachedTextEncoder):
            encoder.clear()
            encoder.max_bytes = int(max_bytes)


@contextlib.contextmanager
def _torch_threads(count: int):
    """Runs the block with torch (when a text encoder loaded it) on `count` threads. MiniLM's
    embeddings change in the last bit with the thread count (1.1e-7 seen), so every runner and
    worker count encodes on one thread and writes the same bytes; a pool uses one process per
    core anyway, and torch's default of every core per process would oversubscribe them."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    # One encoder call per shard; the cached encoder embeds each text it has not seen once.
    texts = [report_text(r.report, r.labels, options.prompt_template) for r, _ in records]
    with _torch_threads(1):
        embeddings = encoder.encode(texts)
    return [(r, c, embedding) for (r, c), embedding in zip(records, embeddings)]


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


def _import_before_fork(text_encoder: str) -> None:
    """Forked workers inherit imported modules: import the slow ones once here (neurokit2 ~1-5 s;
    for MiniLM, torch + transformers + sentence-transformers ~10 s) instead of once per worker.
    Only imports: a model loaded (run) before fork could hang the workers' OpenMP thread pools."""
    import neurokit2  # noqa: F401
    import scipy.signal  # noqa: F401
    import wfdb  # noqa: F401

    if text_encoder == "minilm":
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:  # the workers' encoder load reports it, naming the extra to install
            pass


def _warm_worker(text_encoder: str) -> None:
    """Pool initializer: each worker loads its text encoder once, before its first shard."""
    _encoder(text_encoder)


def plan(options: PrepOptions) -> tuple[list[ShardPlan], list[dict]]:
    """(every shard of the output, skipped entries found while listing). Deterministic: the same
    options give the same plans in every process, which is what lets a runner's workers re-plan."""
    items, listing_skipped = list_items(options.source)
    return plan_shards(items, options.shard_size, options.split_fractions), listing_skipped


def text_encoder_dim(name: str) -> int:
    """Width of the embeddings `name` gives (0 for none), without loading a model."""
    if name in ("none", "", None):
        return 0
    if name == "minilm":
        return MiniLMEncoder.dim
    return int(get_text_encoder(name).dim)  # hashing and precomputed: no model to load


def options_fingerprint(options: PrepOptions) -> dict:
    """What decides the bytes of a prep output: source and its options, sharding, split, text
    encoder (name, width, prompt template) and the example/prep format versions. Not the runner,
    worker count or progress bar."""
    source = dataclasses.asdict(options.source)
    for key in ("root", "ecg_root"):  # the same folder named two ways is the same source
        if source[key] and source[key] != "bundled":
            source[key] = os.path.abspath(source[key])
    fingerprint = dict(source=source, shard_size=options.shard_size,
                       split_fractions=[float(f) for f in options.split_fractions],
                       text_encoder=options.text_encoder,
                       embedding_dim=text_encoder_dim(options.text_encoder),
                       prompt_template=options.prompt_template,
                       example_format_version=FORMAT_VERSION, prep_version=PREP_VERSION)
    if options.text_encoder.startswith("precomputed:"):
        fingerprint["precomputed_file_bytes"] = os.path.getsize(options.text_encoder.split(":", 1)[1])
    return fingerprint


_OUTPUT_PATTERNS = ("*.array_record", "*.array_record.tmp", "*.array_record.meta.json",
                    "*.array_record.meta.json.tmp", SUMMARY_JSON, SKIPPED_JSONL, FINGERPRINT_JSON,
                    FINGERPRINT_JSON + ".tmp")


def _prep_outputs(out_dir: str) -> list[str]:
    """The files a prep run writes in `out_dir` (nothing else there is ever touched)."""
    return sorted({path for pattern in _OUTPUT_PATTERNS
                   for path in glob.glob(os.path.join(glob.escape(out_dir), pattern))})


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def claim_out_dir(options: PrepOptions) -> None:
    """Makes `options.out_dir` this run's: refuses (UniECGError) a folder prepared with other
    options, or holding outputs of an older prep with no fingerprint, unless `overwrite`, which
    removes the old outputs first; then writes the fingerprint (before any shard, so that a run
    killed early is checked on resume too)."""
    out_dir = options.out_dir
    wanted = options_fingerprint(options)
    path = os.path.join(out_dir, FINGERPRINT_JSON)
    outputs = _prep_outputs(out_dir)
    if outputs and not options.overwrite:
        hint = "pass --overwrite to replace its outputs, or choose another --out"
        if not os.path.exists(path):
            raise UniECGError(f"{out_dir}: holds prep outputs but no {FINGERPRINT_JSON} (written "
                              f"by an older uniecg prep?), so resuming could mix options; {hint}")
        try:
            with open(path) as f:
                found = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UniECGError(f"{path}: unreadable options fingerprint ({e}); {hint}") from None
        if found != wanted:
            before, now = _flatten(found if isinstance(found, dict) else {}), _flatten(wanted)
            changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
                       for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
            raise UniECGError(f"{out_dir}: prepared with other options ({'; '.join(changed)}); "
                              f"{hint}")
    if options.overwrite:
        for output in outputs:
            os.remove(output)
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(wanted, f, indent=2)
    os.replace(path + ".tmp", path)


def _run_local(options: PrepOptions, pending: list[ShardPlan], progress) -> None:
    """Writes the pending shards with a process pool on this machine (in-process for one worker)."""
    jobs = [(options, plan) for plan in pending]
    if options.workers > 1 and len(jobs) > 1:
        _import_before_fork(options.text_encoder)
        context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        with context.Pool(min(options.workers, len(jobs)), initializer=_warm_worker,
                          initargs=(options.text_encoder,)) as pool:
            for meta in pool.imap_unordered(_write_shard_job, jobs):
                progress.update(meta["num_records"] + len(meta["skipped"]))
    else:
        for job in jobs:
            meta = _write_shard_job(job)
            progress.update(meta["num_records"] + len(meta["skipped"]))


def _beam_runner():
    """`data_prep.beam.run_beam`, or a clear error when the optional `beam` extra is missing."""
    try:
        from data_prep.beam import run_beam  # optional `beam` extra (apache_beam)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("apache_beam"):
            raise
        raise UniECGError("Beam runners need apache_beam: pip install 'uniecg_jax[beam]' "
                          "(or use --runner local)") from None
    return run_beam


def run_prep(options: PrepOptions) -> dict:
    """Prepares (or finishes preparing) `options.out_dir`; returns the summary dict."""
    check_text_encoder_name(options.text_encoder)
    if options.runner not in RUNNERS:
        raise UniECGError(f"unknown runner {options.runner!r}; choose from {', '.join(RUNNERS)}")
    for flag, path in (("--root", options.source.root), ("--out", options.out_dir)):
        if "://" in path:  # readers and writers use file paths: a URL would be a local folder
            raise UniECGError(f"{flag} {path}: a URL; mount it on every machine that runs prep "
                              "(e.g. gcsfuse) and pass the mounted path")
    run_beam = _beam_runner() if options.runner != "local" else None
    started = time.time()
    plans, listing_skipped = plan(options)
    claim_out_dir(options)
    pending = [p for p in plans if not _shard_done(options.out_dir, p)]
    progress = tqdm(total=sum(len(p.items) for p in plans), unit="rec", desc="prep",
                    disable=not options.progress, file=sys.stderr)
    progress.update(sum(len(p.items) for p in plans) - sum(len(p.items) for p in pending))
    if options.runner == "local":
        _run_local(options, pending, progress)
    elif pending:
        run_beam(options, [p.file for p in pending])
        progress.update(sum(len(p.items) for p in pending))
    progress.close()
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
                       progress=not args.no_progress, overwrite=args.overwrite,
                       runner=args.runner, beam_args=tuple(shlex.split(args.beam_options)))


def handle(args) -> int:
    summary = run_prep(options_from_args(args))
    print(f"wrote {summary['num_written']} records ({summary['num_records']}) to {args.out}; "
          f"skipped {summary['num_skipped']} (see {SKIPPED_JSONL})")
    return 0
