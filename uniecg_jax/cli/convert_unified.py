"""`uniecg convert export-unified`: the whole stage-2 model (+ diffusion) as an HF-style directory.

  uniecg convert export-unified --ckpt /tmp/stage2 --diffusion /tmp/diffusion --out /tmp/uniecg_hf

The lead wires it into `uniecg convert` by calling `add_parser(actions)` on its sub-parsers.
"""
from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-unified", help="stage-2 model (+ diffusion) -> HF LLM dir + safetensors components")
    parser.add_argument("--ckpt", required=True, help="stage-2 train workdir or model dir")
    parser.add_argument("--diffusion", default=None, help="diffusion model dir to include")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default=None, help="LLM tensor dtype (default: param dtype)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="HF LLM safetensors shard size, HF semantics ('5GB' = 5e9 bytes, "
                             "'2GiB')")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first: run the same command on "
                             "every host of a pod; each host writes the slices it holds")
    parser.set_defaults(handler=run_export_unified)


def run_export_unified(args) -> int:
    from uniecg_jax import sharding
    from uniecg_jax.convert.unified_export import export_unified

    sharding.maybe_initialize_distributed(args.distributed)

    export_unified(args.ckpt, args.out, diffusion=args.diffusion, dtype=args.dtype,
                   max_shard_size=args.max_shard_size)
    print(f"wrote {args.out} (llm/ = HF causal LM with the [ECG] tokens; uniecg_config.json; "
          "component safetensors). Load with uniecg_jax.convert.unified_export.load_unified_export")
    return 0
