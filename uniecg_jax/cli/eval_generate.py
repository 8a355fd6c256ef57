"""`uniecg eval generate`: fidelity of generated ECGs (HR MAE, QRS F1, amplitudes, CLIP score, FID).

  uniecg eval generate --ckpt W --out W/eval/generate.json [--clip W/clip] [--n 2] [--steps 50]

Generates --n ECGs per evaluation record (bundled real + synthetic records, a `uniecg prep` folder
or a WFDB folder) from its report, sex, age and heart rate, batched, plus an unconditional baseline
(guidance 0). --clip names the ECG-text CLIP checkpoint: loaded when present, else trained on the
bundled + synthetic data (--clip-steps) and saved there. Wire into `cli/eval.py` with
`eval_generate.add_parser(jobs)`.

Sharded and resumable like `eval interpret`: blocks of --batch-size records go round robin to the
hosts (`jax.process_index/count`, or --host-index/--host-count to run hosts by hand), each block
sharded over the host's devices; each host appends per-record statistics to OUT.part-I-of-N and a
rerun resumes. Once every part is done, the set-level metrics (FID, precision/recall, CLIP-score
means, HR MAE) are computed once over all parts and written to OUT.
"""
from __future__ import annotations


def add_parser(jobs_subparsers) -> None:
    parser = jobs_subparsers.add_parser("generate", help="generation fidelity metrics",
                                        description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="diffusion workdir or model checkpoint")
    parser.add_argument("--out", required=True, help="results .json path")
    parser.add_argument("--data", default="bundled",
                        help="'bundled', a `uniecg prep` folder or a WFDB folder")
    parser.add_argument("--clip", default=None, help="ECG-CLIP checkpoint dir (trained if absent)")
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=2, help="ECGs per record")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance (default: the model's sample.guidance)")
    parser.add_argument("--max-records", type=int, default=0, help="0 = all")
    parser.add_argument("--batch-size", type=int, default=32, help="records per generation batch")
    parser.add_argument("--no-baseline", action="store_true", help="skip the guidance-0 baseline")
    parser.add_argument("--conv-algorithm", default=None,
                        help="how the VAE decoder convolves, same weights: direct or winograd "
                             "(faster from ~4 ECGs per batch); default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--via", default="diffusion", choices=("diffusion", "llm"),
                        help="llm: condition through a stage-2 model's [ECG] tokens (needs "
                             "--stage2-ckpt), reported beside the true text embedding")
    parser.add_argument("--stage2-ckpt", default=None, help="stage-2 workdir or model dir")
    parser.add_argument("--host-index", type=int, default=None)
    parser.add_argument("--host-count", type=int, default=None)
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (every host of a pod runs "
                             "the same command)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from uniecg_jax import sharding
    from uniecg_jax.eval import generate_eval, sharded_job
    from uniecg_jax.errors import UniECGError

    if args.n < 1 or args.steps < 1:
        raise UniECGError(f"--n and --steps must be >= 1, got {args.n} and {args.steps}")
    sharding.maybe_initialize_distributed(args.distributed)
    if args.via == "llm":
        return run_via_llm(args)
    host, hosts, manual = sharded_job.resolve_hosts(args.host_index, args.host_count)
    results = generate_eval.run_eval(
        args.ckpt, args.out, clip_dir=args.clip, data=args.data, n=args.n, sampler=args.sampler,
        steps=args.steps, guidance=args.guidance, baseline=not args.no_baseline,
        max_records=args.max_records, clip_steps=args.clip_steps, seed=args.seed,
        batch_size=args.batch_size, process_index=host, process_count=hosts,
        manual_hosts=manual, conv_algorithm=args.conv_algorithm)
    if results is None:
        print(f"wrote {sharded_job.part_path(args.out, host, hosts)}; the merge waits for the "
              "other hosts' parts")
        return 0
    print(f"wrote {args.out} ({results['num_records']} records x {args.n})")
    for line in generate_eval.summary_lines(results):
        print(line)
    return 0


def run_via_llm(args) -> int:
    """Fidelity metrics of ECGs generated through the stage-2 model's [ECG] tokens, beside the
    same metrics with the true text-encoder embedding, and the predicted-vs-true cosine, on the
    stage-2 held-out reports (`--data bundled`) or a prep/WFDB folder."""
    import os

    from uniecg_jax.data.text_encoder import get_text_encoder
    from uniecg_jax.diffusion.pipeline import load_pipeline
    from uniecg_jax.errors import UniECGError
    from uniecg_jax.eval import llm_generate_eval, sharded_job
    from uniecg_jax.eval.generate_eval import clip_on_every_host
    from uniecg_jax.data.bundled import bundled_split
    from uniecg_jax.data.measure import with_measured_rhythms
    from uniecg_jax.inference.chat import UnifiedModel

    if not args.stage2_ckpt:
        raise UniECGError("--via llm needs --stage2-ckpt (a stage-2 workdir or model dir)")
    unified = UnifiedModel.load(args.stage2_ckpt,
                                diffusion=load_pipeline(args.ckpt, args.conv_algorithm))
    config = unified.config
    text_encoder = get_text_encoder(str(config.text.encoder))
    if args.data == "bundled":
        records = bundled_split(int(config.data.holdout_every), int(config.data.num_synthetic),
                                int(config.seed))["test"]
    else:
        from uniecg_jax.eval.interpret_eval import load_eval_records
        records = load_eval_records(args.data, config)
    records = with_measured_rhythms(records)
    if args.max_records:
        records = records[:args.max_records]
    host, hosts, manual = sharded_job.resolve_hosts(args.host_index, args.host_count)
    clip = None
    if args.clip:
        clip = clip_on_every_host(args.clip, records, text_encoder, str(config.text.encoder),
                                  steps=args.clip_steps, seed=args.seed, process_index=host,
                                  process_count=hosts, manual_hosts=manual)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    metrics = llm_generate_eval.run(unified, records, args.out, text_encoder=text_encoder,
                                    n=args.n, steps=args.steps, guidance=args.guidance,
                                    seed=args.seed, clip=clip, batch_size=args.batch_size,
                                    process_index=host, process_count=hosts, manual_hosts=manual)
    if metrics is None:
        print(f"wrote {sharded_job.part_path(args.out, host, hosts)}; the merge waits for the "
              "other hosts' parts")
        return 0
    print(f"wrote {args.out} ({len(records)} records, via the LLM's [ECG] tokens)")
    for line in llm_generate_eval.summary_lines(metrics):
        print(line)
    return 0
