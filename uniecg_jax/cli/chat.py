"""`uniecg chat`: one model that interprets an ECG or generates one from text, as it decides.

  uniecg chat --ckpt /tmp/stage2 --diffusion /tmp/diffusion \\
      --prompt "Show me sinus tachycardia at 130 bpm in a 70-year-old woman"
  uniecg chat --ckpt /tmp/stage2 --ecg uniecg_jax/assets/ecg_samples/cinc2021/E07500 --prompt "Interpret this ECG."
  uniecg chat --ckpt /tmp/stage2 --image scan.png --prompt "Interpret this ECG."   # image tower only
  uniecg chat --ckpt /tmp/stage2 --diffusion /tmp/diffusion          # interactive; ':ecg PATH' loads a record

When the model answers with its [ECG] tokens the ECG is sampled and written to --out as WFDB + PNG;
heart rate, age and sex come from the model's attribute head (what it read in the request), unless
--sex/--age/--hr give them, or --conditions-from-text takes them from regular expressions on the
request text.
"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="interpret or generate ECGs with the unified model",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="stage-2 train workdir or model dir")
    parser.add_argument("--diffusion", default=None, help="diffusion model dir (for generation)")
    parser.add_argument("--ecg", default=None, help="WFDB record (path without extension)")
    parser.add_argument("--image", default=None,
                        help="ECG image (PNG/JPEG of a printed, scanned or photographed ECG; a "
                             "model with an image tower; with --ecg, that record's page)")
    parser.add_argument("--prompt", default=None, help="one request; without it: interactive")
    parser.add_argument("--out", default="generated_ecgs", help="folder for generated records")
    parser.add_argument("--sex", default=None, choices=["M", "F"])
    parser.add_argument("--age", type=float, default=None)
    parser.add_argument("--hr", type=float, default=None, help="heart rate (bpm)")
    parser.add_argument("--conditions-from-text", action="store_true",
                        help="override the model's sex/age/heart rate with those regular "
                             "expressions find in the request (\"HR 110\", \"60-year-old woman\")")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the diffusion model's sample.steps)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run_chat)


def _read_ecg(path):
    import sys

    from uniecg_jax.data import read_record
    from uniecg_jax.data.record import short_record_warning
    record = read_record(path)
    if short_record_warning(record):
        print(f"uniecg: warning: {short_record_warning(record)}", file=sys.stderr)
    return record.to_encoder_input()


def _read_image(path, config):
    from uniecg_jax.data.image_preprocess import load_image
    from uniecg_jax.errors import UniECGError
    page = load_image(path)
    if config.model.get("vision_tower") is None:
        raise UniECGError(f"{path}: this model has no image tower (model.vision_tower): it reads "
                          "ECG signals only; attach the ECG record instead")
    return page


def run_chat(args) -> int:
    from uniecg_jax.caches import enable_compilation_cache
    from uniecg_jax.checkpoint import load_checked_config
    from uniecg_jax.inference.chat import UnifiedModel

    _, config = load_checked_config(args.ckpt, "stage2", "uniecg chat")
    if args.diffusion:
        load_checked_config(args.diffusion, "diffusion", "uniecg chat --diffusion")
    # A bad record or image fails before the model loads.
    ecg = _read_ecg(args.ecg) if args.ecg else None
    image = _read_image(args.image, config) if args.image else None
    enable_compilation_cache()
    model = UnifiedModel.load(args.ckpt, diffusion=args.diffusion)
    count = 0

    def answer(prompt):
        nonlocal count
        turn = model.chat(prompt, ecg=ecg, image=image, out_dir=args.out, sex=args.sex, age=args.age,
                          heart_rate=args.hr, max_new_tokens=args.max_new_tokens, steps=args.steps,
                          seed=args.seed + count, record_name="chat",
                          parse_request=args.conditions_from_text)
        count += 1
        if turn.emitted_ecg_tokens:
            print(f"[ECG tokens emitted] conditions {turn.conditions} "
                  f"(from {turn.conditions_source})")
            for stem in turn.files:
                print(f"wrote {stem}.hea/.dat/.png")
        if turn.text:
            print(turn.text)

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("uniecg chat: type a request; ':ecg PATH' attaches a record, ':image PATH' an ECG "
          "image, ':noecg' / ':noimage' drop them, ':q' quits")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line in (":q", ":quit", "exit"):
            return 0
        if line.startswith(":ecg "):
            ecg = _read_ecg(line[5:].strip())
            print(f"attached {line[5:].strip()}")
        elif line.startswith(":image "):
            image = _read_image(line[7:].strip(), config)
            print(f"attached {line[7:].strip()}")
        elif line == ":noecg":
            ecg = None
        elif line == ":noimage":
            image = None
        elif line:
            answer(line)
