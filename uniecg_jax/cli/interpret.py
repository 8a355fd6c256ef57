"""`uniecg interpret --ckpt DIR --ecg RECORD [RECORD ...] [--prompt TEXT]`: print a report per ECG.

RECORD is a WFDB record path without extension (`.hea` + `.dat`/`.mat`); records are read, mapped
to the standard lead order, resampled to the encoder's rate and interpreted in one batch.
"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("interpret", help="interpret 12-lead ECG records (WFDB)",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("--ckpt", required=True, help="train workdir or model checkpoint")
    parser.add_argument("--ecg", required=True, nargs="+", help="WFDB record path(s), no extension")
    parser.add_argument("--prompt", default=None, help="question to ask (default: interpret)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import json
    import sys

    import numpy as np

    from uniecg_jax.checkpoint import load_checked_config
    from uniecg_jax.data import read_record
    from uniecg_jax.data.record import short_record_warning

    # Inputs and the checkpoint's kind are checked before the slow imports and the model load.
    records = [read_record(path) for path in args.ecg]
    for record in records:
        if short_record_warning(record):
            print(f"uniecg: warning: {short_record_warning(record)}", file=sys.stderr)
    load_checked_config(args.ckpt, "stage1", "uniecg interpret")

    from uniecg_jax.caches import enable_compilation_cache
    from uniecg_jax.inference.decoding import Sampling
    from uniecg_jax.inference.interpret import Interpreter

    enable_compilation_cache()  # a second call reuses this one's compiled encoder and decoder
    interpreter = Interpreter.load(args.ckpt)
    reports = interpreter.interpret(
        np.stack([r.to_encoder_input() for r in records]), args.prompt,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
        sampling=Sampling(args.temperature, args.top_k, args.top_p))
    for path, record, report in zip(args.ecg, records, reports):
        if args.json:
            print(json.dumps({"ecg": path, "record_id": record.record_id, "report": report}))
        else:
            print(f"== {path}\n{report}\n")
    return 0
