"""`uniecg generate`: text (+ sex, age, heart rate) -> 12-lead ECGs as WFDB records and PNGs.

  uniecg generate --ckpt W --text "sinus tachycardia" --hr 110 --age 60 --sex F --n 4 --out DIR \
      [--sampler ddim --steps 50 --guidance 2 --seed 0 --rate 500 --conv-algorithm winograd]

--ckpt is a diffusion train workdir (its model/) or a model checkpoint (`uniecg train` export or
`uniecg convert diffusets`). The report is embedded with the checkpoint's text encoder
(`text.encoder`, `text.template`; --text-encoder / --template / --api-key-env replace them for this
run, e.g. `--text-encoder endpoint:text-embedding-ada-002@https://api.openai.com/v1` for converted
DiffuSETS weights), or given precomputed with --embedding FILE.npy ([D]). An encoder whose width is
not the UNet's fails naming both widths. All N
samples run as one batch; the same --seed gives the same ECGs. Writes DIR/gen_000.{hea,dat,png}, ...
(12 named leads in mV; PNG on a 25 mm/s, 10 mm/mV grid) and DIR/generation.json. A second run into
the same DIR adds gen_004... and generation_004.json instead of replacing (--overwrite replaces).
"""
from __future__ import annotations

DEFAULT_DDIM_STEPS = 50


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate 12-lead ECGs from a text report",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="diffusion workdir or model checkpoint")
    parser.add_argument("--text", default=None, help="report text (or use --embedding)")
    parser.add_argument("--embedding", default=None, help=".npy with a precomputed [D] embedding")
    parser.add_argument("--text-encoder", default=None,
                        help="text encoder for --text instead of the checkpoint's: minilm, hash:D, "
                             "precomputed:FILE.npz or endpoint:MODEL@BASE_URL")
    parser.add_argument("--template", default=None, choices=("plain", "diffusets"),
                        help="prompt template for --text instead of the checkpoint's")
    parser.add_argument("--api-key-env", default=None,
                        help="environment variable holding the endpoint's API key ('' = none)")
    parser.add_argument("--hr", type=float, required=True, help="heart rate, bpm")
    parser.add_argument("--age", type=float, required=True, help="age, years")
    parser.add_argument("--sex", required=True, help="M or F")
    parser.add_argument("--n", type=int, default=1, help="number of ECGs")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--sampler", default=None, choices=("ddim", "ddpm"),
                        help="default: the config's sample.sampler")
    parser.add_argument("--steps", type=int, default=None,
                        help="DDIM steps (ddpm uses all; default: the config's, or 50 when "
                             "--sampler ddim overrides a ddpm config)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (1 = conditional, 0 = unconditional)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=None,
                        help="output sample rate in Hz (native 102.4; e.g. 500)")
    parser.add_argument("--conv-algorithm", default=None,
                        help="how the VAE decoder convolves, same weights: direct or winograd "
                             "(faster from ~4 ECGs per batch); default: the checkpoint's")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG plots")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace gen_000... in --out (default: number after existing ones)")
    parser.set_defaults(handler=run)


def with_text_options(config, encoder: str | None, template: str | None,
                      api_key_env: str | None):
    """`config` with `text.encoder` / `text.template` / `text.endpoint.api_key_env` replaced by
    the given (non-None) values (a new config)."""
    import ml_collections

    if encoder is None and template is None and api_key_env is None:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    if encoder is not None:
        config.text.encoder = encoder
    if template is not None:
        config.text.template = template
    if api_key_env is not None:
        if "endpoint" not in config.text:
            config.text.endpoint = ml_collections.ConfigDict()
        config.text.endpoint.api_key_env = api_key_env
    return config


def text_embedding_for(config, text: str | None, embedding_path: str | None):
    """`[D]` float32: the report through the config's text encoder, or a precomputed .npy."""
    import numpy as np

    from uniecg_jax.diffusion.conditioning import ConditionError

    if embedding_path:
        try:
            embedding = np.load(embedding_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConditionError(f"{embedding_path}: cannot read a .npy embedding: {e}") from None
        return np.asarray(embedding, np.float32)  # [D] or [B, D]; widths checked downstream
    if text is None or not text.strip():
        raise ConditionError("give the report with --text (non-empty) or --embedding FILE.npy")
    from uniecg_jax.data.text_encoder import text_encoder_for
    return text_encoder_for(config).encode([text])[0]


def run(args) -> int:
    import json
    import os

    from uniecg_jax.caches import enable_compilation_cache
    from uniecg_jax.checkpoint import load_checked_config
    from uniecg_jax.diffusion.conditioning import ConditionError
    from uniecg_jax.diffusion.ecg_writer import write_generated
    from uniecg_jax.diffusion.pipeline import load_pipeline

    if args.n < 1:
        raise ConditionError(f"--n must be >= 1, got {args.n}")
    if args.rate is not None and not 0 < args.rate <= 10000:
        raise ConditionError(f"--rate must be in (0, 10000] Hz, got {args.rate}")
    load_checked_config(args.ckpt, "diffusion", "uniecg generate")  # before loading any weights
    enable_compilation_cache()
    pipeline, config = load_pipeline(args.ckpt, args.conv_algorithm)
    sample = config.sample
    sampler = args.sampler or str(sample.sampler)
    # --sampler ddim on a DDPM-1000 config (converted DiffuSETS) means DDIM-50 unless --steps says.
    default_steps = sample.steps if sampler == str(sample.sampler) else DEFAULT_DDIM_STEPS
    steps = int(args.steps if args.steps is not None else default_steps)
    guidance = float(args.guidance if args.guidance is not None else sample.guidance)
    eta = float(args.eta if args.eta is not None else sample.eta)
    rate = float(args.rate if args.rate is not None else sample.output_rate)
    if steps < 1:
        raise ConditionError(f"--steps must be >= 1, got {steps}")
    embedding = text_embedding_for(
        with_text_options(config, args.text_encoder, args.template, args.api_key_env),
        args.text, args.embedding)
    ecgs = pipeline.generate(embedding, sex=args.sex, age=args.age, hr=args.hr, n=args.n,
                             sampler=sampler, steps=steps, guidance=guidance, seed=args.seed,
                             eta=eta, sample_rate=rate)
    comments = [f"text: {args.text or args.embedding}", f"hr {args.hr:g} bpm, age {args.age:g}, "
                f"sex {args.sex}", f"{sampler} {steps} steps, guidance {guidance:g}, seed {args.seed}"]
    stems = write_generated(ecgs, args.out, rate, comments=comments, png=not args.no_png,
                            overwrite=args.overwrite)
    first = stems[0].rsplit("_", 1)[1]
    info_name = "generation.json" if first == "000" else f"generation_{first}.json"
    with open(os.path.join(args.out, info_name), "w") as f:
        json.dump(dict(ckpt=os.path.abspath(args.ckpt), text=args.text, embedding=args.embedding,
                       hr=args.hr, age=args.age, sex=args.sex, n=args.n, sampler=sampler,
                       steps=steps, guidance=guidance, eta=eta, seed=args.seed, rate=rate,
                       records=[os.path.basename(s) for s in stems]), f, indent=1)
    print(f"wrote {len(stems)} ECGs ({ecgs.shape[1]} leads x {ecgs.shape[2]} samples at "
          f"{rate:g} Hz) to {args.out}")
    return 0
