"""`uniecg interpret --ckpt DIR --ecg RECORD [...] [--image FILE [...]] [--prompt TEXT]`: print a
report per ECG.

RECORD is a WFDB record path without extension (`.hea` + `.dat`/`.mat`); records are read, mapped
to the standard lead order, resampled to the encoder's rate and interpreted in one batch. FILE is a
PNG/JPEG (or any image PIL reads) of a printed, scanned or photographed 12-lead ECG; it needs a
model with an image tower (`model.vision_tower`). Pairing: --ecg alone reads each record (a model
with an image tower also sees the page rendered from it, as in training, unless --signal-only);
--image alone reads each image; both: as many images as records, the i-th image is the i-th
record's page (each example then carries both).
"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("interpret", help="interpret 12-lead ECGs (WFDB records and/or "
                                   "ECG images)", description=__doc__.split("\n\n")[1])
    parser.add_argument("--ckpt", required=True, help="train workdir or model checkpoint")
    parser.add_argument("--ecg", nargs="+", default=None, help="WFDB record path(s), no extension")
    parser.add_argument("--image", nargs="+", default=None,
                        help="ECG image file(s) (PNG/JPEG); with --ecg, one per record, in order")
    parser.add_argument("--signal-only", action="store_true",
                        help="image-tower model, --ecg alone: do not render the page; the model "
                             "reads the signal only")
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

    from uniecg_jax.checkpoint import load_checked_config
    from uniecg_jax.data import read_record
    from uniecg_jax.data.image_preprocess import load_image
    from uniecg_jax.data.record import short_record_warning
    from uniecg_jax.errors import UniECGError

    ecg_paths, image_paths = args.ecg or [], args.image or []
    if not ecg_paths and not image_paths:
        raise UniECGError("give --ecg RECORD ..., --image FILE ... or both")
    if ecg_paths and image_paths and len(ecg_paths) != len(image_paths):
        raise UniECGError(f"{len(ecg_paths)} records and {len(image_paths)} images: with both, "
                          "give one image per record (the i-th image is the i-th record's page)")
    # Inputs and the checkpoint's kind are checked before the slow imports and the model load.
    records = [read_record(path) for path in ecg_paths]
    for record in records:
        if short_record_warning(record):
            print(f"uniecg: warning: {short_record_warning(record)}", file=sys.stderr)
    pages = [load_image(path) for path in image_paths]
    _, config = load_checked_config(args.ckpt, "stage1", "uniecg interpret")
    if pages and config.model.get("vision_tower") is None:
        raise UniECGError(f"{args.ckpt}: this model has no image tower (model.vision_tower): it "
                          "reads ECG signals only; give --ecg RECORD instead of --image")

    from uniecg_jax.caches import enable_compilation_cache
    from uniecg_jax.inference.decoding import Sampling
    from uniecg_jax.inference.interpret import Interpreter

    enable_compilation_cache()  # a second call reuses this one's compiled encoder and decoder
    interpreter = Interpreter.load(args.ckpt)
    batch = interpreter.model_inputs(
        [r.to_encoder_input() for r in records] if records else None, pages or None,
        render_missing_images=not args.signal_only)
    reports = interpreter.interpret(
        batch, args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed,
        sampling=Sampling(args.temperature, args.top_k, args.top_p))
    for row, (report, kind) in enumerate(zip(reports, batch.kinds)):
        ecg = ecg_paths[row] if ecg_paths else None
        image = image_paths[row] if image_paths else None
        if args.json:
            record_id = records[row].record_id if records else None
            print(json.dumps({"ecg": ecg, "image": image, "record_id": record_id, "kind": kind,
                              "report": report}))
        else:
            print(f"== {' + '.join(p for p in (ecg, image) if p)} ({kind})\n{report}\n")
    return 0
