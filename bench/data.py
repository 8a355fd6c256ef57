"""Data-layer throughput on this machine: records/s through `uniecg prep` (local process pool, per
text encoder, and on Beam's DirectRunner) and through each grain pipeline, against reading the same
records directly with `wfdb.rdrecord` (one process, and `--workers` processes: the same cores).

    python bench/data.py [--copies 32] [--workers 2] [--text-encoders hash:384,minilm]
                         [--runners local,direct] [--conversations] [--batch-size 8]

The bundled 50 Challenge records are copied `--copies` times into a temporary dataset root (each copy
its own patients). Each prep runs as a user runs it, `python -m data_prep` in a fresh process
(interpreter start, imports, text-encoder load included), twice: on `--copies` and on
`--small-copies` copies. "end to end" is records / wall time of the large run; "steady" is the
marginal rate between the two runs ((N - n) / (T - t): start-up cancels), the figure a dataset of
800k records sees; "start-up" is the seconds left over. CPU milliseconds per record of an
in-process prep (warm) give the same comparison without the noise of other load. The copies repeat
every report and a prep worker embeds each distinct report once; the CPU rows "no report reused
across shards" turn that off (the cost for reports that never repeat). Targets (issue 18): steady
local prep at >= 0.5x of `wfdb.rdrecord` on the same cores with the hashing encoder, >= 0.25x with
MiniLM.
The grain pipelines then read the local hashing output for one epoch after one warm-up epoch.
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_root(directory: str, copies: int) -> list[str]:
    from uniecg_jax.data import bundled_record_paths

    paths = []
    for copy in range(copies):
        for path in bundled_record_paths():
            name = f"C{copy}{os.path.basename(path)}"
            for ext in (".hea", ".mat"):
                with open(path + ext, "rb") as f:
                    data = f.read()
                if ext == ".hea":  # the header names its record and signal file
                    base = os.path.basename(path)
                    data = data.replace(base.encode(), name.encode())
                with open(os.path.join(directory, name + ext), "wb") as f:
                    f.write(data)
            paths.append(os.path.join(directory, name))
    return paths


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _read_all(paths: list[str]) -> int:
    import wfdb

    for path in paths:
        wfdb.rdrecord(path)
    return len(paths)


def wfdb_rate(paths: list[str], processes: int) -> float:
    """records/s of `wfdb.rdrecord` over `paths` split across `processes` forked processes (warm
    imports and page cache; pool start included, as prep's is)."""
    _read_all(paths[:processes])
    start = time.perf_counter()
    if processes == 1:
        _read_all(paths)
    else:
        chunks = [paths[i::processes] for i in range(processes)]
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_read_all, chunks)
    return rate(len(paths), time.perf_counter() - start)


def timed_prep(root: str, out: str, workers: int, text_encoder: str, runner: str,
               conversations: bool) -> tuple[int, float]:
    """(records written, wall seconds) of `python -m data_prep` in a fresh process."""
    command = [sys.executable, "-m", "data_prep", "--source", "cinc", "--root", root, "--out", out,
               "--workers", str(workers), "--shard-size", "25", "--text-encoder", text_encoder,
               "--runner", runner, "--no-progress"] + ([] if conversations else
                                                        ["--no-conversations"])
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=REPO))
    seconds = time.perf_counter() - start
    from uniecg_jax.data.examples import read_summary

    return read_summary(out)["num_written"], seconds


def cpu_ms_per_record(root: str, small_root: str, out: str, text_encoder: str,
                      conversations: bool, reuse: bool = True) -> float:
    """CPU milliseconds per record of prep in this process (one worker; imports and encoder
    warmed on `small_root` first, its embedding cache then emptied as in a fresh worker): the
    steady cost of a record, insensitive to other load. `reuse=False` turns the cache off: the
    cost when no report repeats across shards (the copies here repeat every report)."""
    from data_prep.prep import EMBEDDING_CACHE_BYTES, PrepOptions, reset_embedding_caches, run_prep
    from data_prep.sources import SourceOptions

    def options(source_root, folder):
        return PrepOptions(SourceOptions("cinc", source_root, build_conversations=conversations),
                           out_dir=folder, workers=1, shard_size=25, text_encoder=text_encoder,
                           progress=False)

    run_prep(options(small_root, out + "-warm"))
    reset_embedding_caches(EMBEDDING_CACHE_BYTES if reuse else 0)
    start = time.process_time()
    written = run_prep(options(root, out))["num_written"]
    return (time.process_time() - start) * 1000 / written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # 32 copies (1600 records): the steady rate is (N - n) / (T - t), and with 8 copies the ~1 s
    # between the two runs was within the noise of MiniLM's ~7 s start-up (it read 0.11x there
    # against 0.56x at 32 copies, same host and day).
    parser.add_argument("--copies", type=int, default=32)
    parser.add_argument("--small-copies", type=int, default=2,
                        help="copies of the second, smaller prep run (start-up cancels)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--text-encoders", default="hash:384,minilm")
    parser.add_argument("--runners", default="local,direct",
                        help="direct (Beam DirectRunner, hashing encoder) is skipped without "
                        "apache_beam")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--conversations", action="store_true",
                        help="also build grounded conversations in prep")
    parser.add_argument("--skip-pipelines", action="store_true")
    args = parser.parse_args()
    if not 0 < args.small_copies < args.copies:
        parser.error("need 0 < --small-copies < --copies")

    from uniecg_jax.data import pipelines
    from uniecg_jax.data.examples import read_summary

    work = tempfile.mkdtemp(prefix="bench_data_")
    try:
        root, small_root = os.path.join(work, "root"), os.path.join(work, "small")
        os.makedirs(root)
        os.makedirs(small_root)
        paths = make_root(root, args.copies)
        make_root(small_root, args.small_copies)
        results, notes = {}, {}
        results["wfdb.rdrecord (1 process)"] = wfdb_rate(paths, 1)
        same_cores = f"wfdb.rdrecord ({args.workers} processes)"
        results[same_cores] = wfdb_rate(paths, args.workers)

        runs = [("local", encoder) for encoder in args.text_encoders.split(",")]
        if "direct" in args.runners.split(","):
            if importlib.util.find_spec("apache_beam") is None:
                print("DirectRunner skipped: apache_beam is not installed "
                      "(pip install 'uniecg_jax[beam]')")
            else:
                runs.append(("direct", args.text_encoders.split(",")[0]))
        for runner, encoder in runs:
            if runner not in args.runners.split(","):
                continue
            tag = f"{runner}-{encoder.replace(':', '')}"
            large = timed_prep(root, os.path.join(work, tag), args.workers, encoder, runner,
                               args.conversations)
            small = timed_prep(small_root, os.path.join(work, tag + "-small"), args.workers,
                               encoder, runner, args.conversations)
            if large[1] <= small[1]:  # a loaded host can make the larger run the faster one
                print(f"{runner} {encoder}: the larger run was not slower ({large[1]:.1f} s vs "
                      f"{small[1]:.1f} s); rerun with more --copies on a quieter host")
                continue
            steady = rate(large[0] - small[0], large[1] - small[1])
            name = (f"prep {runner} ({args.workers} workers, {encoder}"
                    f"{', conversations' if args.conversations else ''})")
            results[name + " end to end"] = rate(*large)
            results[name + " steady"] = steady
            notes[name + " steady"] = f"start-up {small[1] - small[0] / steady:.1f} s"

        local_hash = os.path.join(work, "local-" + args.text_encoders.split(",")[0].replace(":", ""))
        if not args.skip_pipelines and os.path.exists(local_hash):
            loaders = {
                "stage1 pipeline": lambda: pipelines.stage1_loader(
                    local_hash, batch_size=args.batch_size, max_length=256, num_epochs=1,
                    process_index=0, process_count=1),
                "stage2 pipeline": lambda: pipelines.stage2_loader(
                    local_hash, batch_size=args.batch_size, num_epochs=1, process_index=0,
                    process_count=1),
                "diffusion pipeline": lambda: pipelines.diffusion_loader(
                    local_hash, batch_size=args.batch_size, num_epochs=1, process_index=0,
                    process_count=1),
            }
            for name, make in loaders.items():
                if name == "stage1 pipeline" and not args.conversations:
                    name += " (conversations built on the fly)"
                sum(len(batch["record_key"]) for batch in make())  # warm: imports, tokenizer
                start = time.perf_counter()
                seen = sum(len(batch["record_key"]) for batch in make())
                results[name] = rate(seen, time.perf_counter() - start)
            train = read_summary(local_hash)["num_records"]["train"]
        else:
            train = "?"
        start = time.process_time()
        _read_all(paths)
        cpu = {"wfdb.rdrecord": (time.process_time() - start) * 1000 / len(paths)}
        for encoder in args.text_encoders.split(","):
            for reuse in (True, False):
                tag = "" if reuse else ", no report reused across shards"
                cpu[f"prep ({encoder}{tag})"] = cpu_ms_per_record(
                    root, small_root, os.path.join(work, f"cpu-{encoder.replace(':', '')}{tag}"),
                    encoder, args.conversations, reuse)
        one, many = results["wfdb.rdrecord (1 process)"], results[same_cores]
        print(f"{len(paths)} records ({train} in train; small run {args.small_copies * 50}), "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs")
        print(f"{'path':<66} {'records/s':>10} {'vs wfdb 1p':>10} {'same cores':>10}")
        for name, value in results.items():
            print(f"{name:<66} {value:>10.1f} {value / one:>9.2f}x {value / many:>9.2f}x"
                  f"  {notes.get(name, '')}")
        print(f"\n{'CPU time per record, one process, warm':<66} {'ms':>10} {'wfdb / it':>10}")
        for name, value in cpu.items():
            print(f"{name:<66} {value:>10.2f} {cpu['wfdb.rdrecord'] / value:>9.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
