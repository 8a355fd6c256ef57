"""`uniecg convert`: Hugging Face safetensors directories <-> uniecg model checkpoints.

    uniecg convert from-hf --hf-dir /ckpt/vicuna-7b --out /ckpt/vicuna-orbax [--config configs/llm.py:vicuna_7b] [--dtype float32]
    uniecg convert to-hf --ckpt /ckpt/vicuna-orbax --out /ckpt/vicuna-hf [--dtype bfloat16]
    uniecg convert diffusets --vae vae.pth --unet unet.pth --out /ckpt/diffusets   (see convert_diffusets)
    uniecg convert export-unified --ckpt W/stage2 --diffusion W/diffusion --out D (see convert_unified)
    uniecg convert from-gem --gem-dir /ckpt/GEM --out /ckpt/gem-uniecg [--ecg-tower ecg_coca.pt]
    uniecg convert to-gem --ckpt /ckpt/gem-uniecg --out /ckpt/GEM-again [--dtype bfloat16] [--distributed]
    uniecg convert export-ecg-coca --ckpt /ckpt/stage1 --out ecg_coca.pt

from-hf infers the model config from the HF config.json unless --config is given (then the shapes
must agree, or the error names the tensor). The tokenizer files travel with the checkpoint.
"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert checkpoints: HF LLMs and GEM releases both ways, DiffuSETS, "
                        "unified HF export")
    actions = parser.add_subparsers(dest="direction", metavar="DIRECTION")
    actions.required = True
    from_hf = actions.add_parser("from-hf", help="HF safetensors dir -> uniecg checkpoint")
    from_hf.add_argument("--hf-dir", required=True, help="LlamaForCausalLM / Qwen2ForCausalLM dir")
    from_hf.add_argument("--out", required=True, help="output checkpoint directory")
    from_hf.add_argument("--config", default=None,
                         help="configs/llm.py:<variant>; default: inferred from config.json")
    from_hf.add_argument("--dtype", default=None, help="param dtype (default: the config's)")
    from_hf.set_defaults(handler=run_from_hf)
    to_hf = actions.add_parser("to-hf", help="uniecg checkpoint -> HF safetensors dir")
    to_hf.add_argument("--ckpt", required=True, help="uniecg checkpoint directory")
    to_hf.add_argument("--out", required=True, help="output HF directory")
    to_hf.add_argument("--dtype", default=None, help="tensor dtype (default: the param dtype)")
    _add_export_options(to_hf)
    to_hf.set_defaults(handler=run_from_ckpt_to_hf)
    from_gem = actions.add_parser("from-gem",
                                  help="GEM release (LLaVA layout) -> stage-1 checkpoint")
    from_gem.add_argument("--gem-dir", required=True, help="GEM release: config.json + safetensors")
    from_gem.add_argument("--out", required=True, help="output checkpoint directory")
    from_gem.add_argument("--ecg-tower", default=None,
                          help="ECG-CoCa .pt when the release holds no tower (default: its "
                               "mm_ecg_tower)")
    from_gem.add_argument("--config", default="configs/stage1.py:gem_7b",
                          help="config whose run settings (dtypes, mesh) the checkpoint keeps; "
                               "shapes come from the release")
    from_gem.set_defaults(handler=run_from_gem)
    to_gem = actions.add_parser("to-gem", help="stage-1 checkpoint -> GEM release (LLaVA layout)")
    to_gem.add_argument("--ckpt", required=True, help="stage-1 model checkpoint or train workdir")
    to_gem.add_argument("--out", required=True, help="output GEM directory")
    to_gem.add_argument("--dtype", default=None, help="tensor dtype (default: the param dtype)")
    _add_export_options(to_gem)
    to_gem.set_defaults(handler=run_to_gem)
    coca = actions.add_parser("export-ecg-coca",
                              help="stage-1 checkpoint's ECG tower -> ECG-CoCa .pt / .safetensors")
    coca.add_argument("--ckpt", required=True, help="stage-1 model checkpoint or train workdir")
    coca.add_argument("--out", required=True, help="output file (.pt or .safetensors)")
    coca.set_defaults(handler=run_export_ecg_coca)
    # Other model families convert through their own modules (argparse only at import time).
    from uniecg_jax.cli import convert_diffusets, convert_unified
    convert_diffusets.add_parser(actions)
    convert_unified.add_parser(actions)


def _add_export_options(parser) -> None:
    """Shard size and multi-host options of the exports that go through `convert.sharded_writer`."""
    parser.add_argument("--max-shard-size", default="5GB",
                        help="safetensors shard size, HF semantics ('5GB' = 5e9 bytes, '2GiB'); "
                             "every host writes the tensor slices it holds")
    parser.add_argument("--max-shard-gb", type=float, default=None,
                        help="(older spelling) shard size in GiB; overrides --max-shard-size")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first: run the same command on "
                             "every host of a pod; each writes the slices it holds")


def _max_shard_bytes(args) -> int | None:
    return None if args.max_shard_gb is None else int(args.max_shard_gb * 1024 ** 3)


def run_from_hf(args) -> int:
    import ml_collections
    from uniecg_jax import checkpoint, sharding
    from uniecg_jax.config import load_config
    from uniecg_jax.convert import hf_llm
    from uniecg_jax.models.llm import LLMConfig

    if args.config:
        config = load_config(args.config, args.config_overrides)
    else:
        config = load_config("configs/llm.py:tiny", args.config_overrides)
        inferred = hf_llm.model_config_from_hf(args.hf_dir)
        config = ml_collections.ConfigDict(config.to_dict())
        config.model = inferred
    if args.dtype:
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.param_dtype = args.dtype
    mesh = sharding.make_mesh(config.mesh)
    model_config = LLMConfig.from_config(config.model)
    params = hf_llm.load_hf_params(args.hf_dir, model_config, mesh=mesh)
    checkpoint.save_model(args.out, params, config, tokenizer_dir=args.hf_dir)
    print(f"wrote {args.out} ({model_config.num_params() / 1e6:.1f}M params, "
          f"{model_config.family})")
    return 0


def run_from_ckpt_to_hf(args) -> int:
    from uniecg_jax import checkpoint, sharding
    from uniecg_jax.convert import hf_llm
    from uniecg_jax.models.llm import LLMConfig

    sharding.maybe_initialize_distributed(args.distributed)
    config = checkpoint.load_model_config(args.ckpt)
    model_config = LLMConfig.from_config(config.model if "model" in config else config)
    # Restored fsdp-sharded over every device of every host: no host holds the whole model.
    params, config = checkpoint.restore_model(args.ckpt, hf_llm.abstract_params_for(model_config))
    hf_llm.save_hf(params, model_config, args.out, tokenizer_dir=checkpoint.tokenizer_path(args.ckpt),
                   dtype=args.dtype, max_shard_size=args.max_shard_size, progress=True,
                   max_shard_bytes=_max_shard_bytes(args))
    print(f"wrote {args.out}")
    return 0


def run_from_gem(args) -> int:
    from uniecg_jax import checkpoint, sharding
    from uniecg_jax.config import load_config, replace_values
    from uniecg_jax.convert import gem

    config = load_config(args.config, args.config_overrides)
    model = gem.release_model_config(args.gem_dir, config.model, args.ecg_tower)
    config = replace_values(config, {"model": model, "init.gem_dir": args.gem_dir})
    result = gem.import_gem(args.gem_dir, mesh=sharding.make_mesh(config.mesh),
                            ecg_tower_ckpt=args.ecg_tower, model_config=config.model)
    checkpoint.save_model(args.out, result.params, config, tokenizer_dir=args.gem_dir)
    gem.save_sidecar(args.out, result)
    for line in result.report:
        print(line)
    print(f"wrote {args.out} (input: {dict(config.model.input)})")
    return 0


def _restore_stage1(path: str):
    from uniecg_jax import checkpoint
    from uniecg_jax.inference.interpret import resolve_model_dir
    from uniecg_jax.models.stage1 import UniECGConfig

    directory = resolve_model_dir(path)
    params, config = checkpoint.restore_model(directory)
    return directory, params, UniECGConfig.from_config(config.model)


def run_to_gem(args) -> int:
    from uniecg_jax import checkpoint, sharding
    from uniecg_jax.convert import gem
    from uniecg_jax.inference.interpret import resolve_model_dir
    from uniecg_jax.models.stage1 import UniECGConfig

    sharding.maybe_initialize_distributed(args.distributed)
    directory = resolve_model_dir(args.ckpt)
    model_config = UniECGConfig.from_config(checkpoint.load_model_config(directory).model)
    # Restored fsdp-sharded over every device of every host: no host holds the whole model.
    params, _ = checkpoint.restore_model(directory, gem.abstract_params_for(model_config))
    base, kept = gem.load_sidecar(directory)
    gem.export_gem(params, model_config, args.out,
                   tokenizer_dir=checkpoint.tokenizer_path(directory), base_config=base,
                   kept=kept, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   max_shard_bytes=_max_shard_bytes(args), progress=True)
    print(f"wrote {args.out} ({len(kept)} kept tensors from the original release; "
          f"ECG lead order {model_config.input.ecg_lead_order}"
          f"{'; image tower ' + gem.VISION_TOWER_DIR + '/' if model_config.vision else ''})")
    return 0


def run_export_ecg_coca(args) -> int:
    from uniecg_jax.convert import ecg_coca

    _, params, model_config = _restore_stage1(args.ckpt)
    state = ecg_coca.export_ecg_coca(params["ecg_tower"], model_config.encoder,
                                     model_config.projector)
    ecg_coca.save_state_dict(state, args.out)
    print(f"wrote {args.out} ({len(state)} tensors)")
    return 0
