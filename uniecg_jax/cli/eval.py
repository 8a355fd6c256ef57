"""`uniecg eval interpret|generate ...`: sharded, resumable evaluation jobs.

  uniecg eval interpret --ckpt /tmp/stage1 --data bundled --out /tmp/eval/results.jsonl

Records are spread over all hosts (`jax.process_index/count`, or --host-index/--host-count to run
hosts by hand) and, within a host, over its devices. Rerunning the same command resumes. A model
with an image tower is scored per input kind (signal / image / both: the record's signal, the page
rendered from it, or both), each (record, kind) one item of the job.
"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluation jobs (sharded, resumable)",
                                   description=__doc__.split("\n\n")[0])
    jobs = parser.add_subparsers(dest="job", metavar="JOB")
    jobs.required = True
    interpret = jobs.add_parser("interpret", help="interpretation metrics vs references")
    interpret.add_argument("--ckpt", required=True, help="train workdir or model checkpoint")
    interpret.add_argument("--data", default="bundled",
                           help="'bundled' (held-out split), a `uniecg prep` folder or a WFDB folder")
    interpret.add_argument("--out", required=True, help="results.jsonl path")
    interpret.add_argument("--batch-size", type=int, default=8, help="per host")
    interpret.add_argument("--max-new-tokens", type=int, default=None)
    interpret.add_argument("--prompt", default=None)
    interpret.add_argument("--kinds", default=None,
                           help="image-tower models: comma-separated input kinds to score "
                                "(default signal,image,both)")
    interpret.add_argument("--host-index", type=int, default=None)
    interpret.add_argument("--host-count", type=int, default=None)
    interpret.add_argument("--judge", action="store_true",
                           help="also score with the GEM-style judge LLM (config eval.judge: any "
                                "OpenAI-compatible endpoint; the API key from its env variable)")
    interpret.add_argument("--judge-model", default=None, help="override eval.judge.model")
    interpret.add_argument("--judge-url", default=None, help="override eval.judge.base_url")
    interpret.set_defaults(handler=run_interpret)
    from uniecg_jax.cli import eval_generate
    eval_generate.add_parser(jobs)


def run_interpret(args) -> int:
    import json
    import os

    from uniecg_jax.caches import enable_compilation_cache
    from uniecg_jax.eval import interpret_eval, sharded_job
    from uniecg_jax.inference.interpret import Interpreter

    host, hosts, manual = sharded_job.resolve_hosts(args.host_index, args.host_count)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    enable_compilation_cache()
    interpreter = Interpreter.load(args.ckpt, command="uniecg eval interpret")
    items = interpret_eval.items_from_records(
        interpret_eval.load_eval_records(args.data, interpreter.config))
    part = interpret_eval.run_shard(interpreter, items, args.out, process_index=host,
                                    process_count=hosts, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, prompt=args.prompt,
                                    kinds=args.kinds.split(",") if args.kinds else None)
    sharded_job.wait_for_hosts(hosts, manual, "uniecg eval interpret: parts written")
    metrics = (interpret_eval.merge(args.out, hosts, items)
               if sharded_job.should_merge(host, manual) else None)
    if metrics is None:
        print(f"wrote {part}; waiting for the other hosts' parts before merging")
        return 0
    kinds = f" x {len(metrics['by_kind'])} input kinds" if "by_kind" in metrics else ""
    print(f"wrote {args.out} ({len(items)} records{kinds}) and {args.out}.metrics.json")
    for line in interpret_eval.summary_lines(metrics):
        print(line)
    print(json.dumps({"baseline_text": metrics["baseline_text"]}))
    if args.judge:
        import dataclasses

        from uniecg_jax.eval.judge import JudgeConfig
        judge_config = JudgeConfig.from_config(interpreter.config.eval.get("judge", None))
        judge_config = dataclasses.replace(
            judge_config, **{k: v for k, v in (("model", args.judge_model),
                                               ("base_url", args.judge_url)) if v})
        scores = interpret_eval.judge_results(args.out, judge_config)
        print(f"judge {scores['judge_model']} ({scores['num_records']} records): average "
              f"{scores['average']:.2f}; {scores['aggregation']}")
    return 0
