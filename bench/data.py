"""Data-layer throughput on this machine: records/s through data_prep (2 processes) and through each
grain pipeline, against reading the same records directly with `wfdb.rdrecord`.

    python bench/data.py [--copies 4] [--workers 2] [--text-encoder hash:384] [--batch-size 8]

The bundled 50 Challenge records are copied `--copies` times into a temporary dataset root (each copy
its own patients), prepared into ArrayRecord shards (process start-up and text-encoder loading
included), then read back by each pipeline for one epoch after one warm-up epoch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--text-encoder", default="hash:384")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--conversations", action="store_true",
                        help="also build grounded conversations in prep (QRS detection per record)")
    args = parser.parse_args()

    import wfdb

    from data_prep.prep import PrepOptions, run_prep
    from data_prep.sources import SourceOptions
    from uniecg_jax.data import pipelines
    from uniecg_jax.data.examples import read_summary

    work = tempfile.mkdtemp(prefix="bench_data_")
    try:
        root, out = os.path.join(work, "root"), os.path.join(work, "out")
        os.makedirs(root)
        paths = make_root(root, args.copies)
        results = {}

        wfdb.rdrecord(paths[0])  # warm
        start = time.perf_counter()
        for path in paths:
            wfdb.rdrecord(path)
        results["wfdb.rdrecord (1 process)"] = rate(len(paths), time.perf_counter() - start)

        options = PrepOptions(SourceOptions(source="cinc", root=root,
                                            build_conversations=args.conversations),
                              out_dir=out, workers=args.workers, shard_size=25,
                              text_encoder=args.text_encoder, progress=False)
        start = time.perf_counter()
        summary = run_prep(options)
        results[f"data_prep ({args.workers} processes, {args.text_encoder}"
                f"{', conversations' if args.conversations else ''})"] = rate(
            summary["num_written"], time.perf_counter() - start)

        train = read_summary(out)["num_records"]["train"]
        loaders = {
            "stage1 pipeline": lambda: pipelines.stage1_loader(
                out, batch_size=args.batch_size, max_length=256, num_epochs=1,
                process_index=0, process_count=1),
            "stage2 pipeline": lambda: pipelines.stage2_loader(
                out, batch_size=args.batch_size, num_epochs=1, process_index=0, process_count=1),
            "diffusion pipeline": lambda: pipelines.diffusion_loader(
                out, batch_size=args.batch_size, num_epochs=1, process_index=0, process_count=1),
        }
        for name, make in loaders.items():
            if name == "stage1 pipeline" and not args.conversations:
                name += " (conversations built on the fly)"
            sum(len(batch["record_key"]) for batch in make())  # warm: imports, tokenizer, files
            start = time.perf_counter()
            seen = sum(len(batch["record_key"]) for batch in make())
            results[name] = rate(seen, time.perf_counter() - start)
        baseline = results["wfdb.rdrecord (1 process)"]
        print(f"{len(paths)} records ({train} in train), batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs")
        print(f"{'path':<60} {'records/s':>10} {'vs wfdb':>8}")
        for name, value in results.items():
            print(f"{name:<60} {value:>10.1f} {value / baseline:>7.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
