"""`uniecg dry-run --config configs/llm.py:llama2_7b [--config.mesh.fsdp=8] [--devices N]`.

Lowers and compiles the train step for the configured mesh against abstract parameters (nothing is
allocated) and prints per-device memory from `compiled.memory_analysis()`, the parameter count and the
FLOPs of one step: what to check before renting a pod. `--devices N` simulates N CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), e.g. `--devices 256` for a v4-256 mesh.
"""
from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dry-run", help="compile the train step for a mesh and print per-device memory",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--config", required=True, help="configs/<file>.py:<variant>")
    parser.add_argument("--devices", type=int, default=0,
                        help="simulate this many CPU devices (must be set before JAX starts)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.set_defaults(handler=run)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2 ** 30:9.3f} GiB"


def _simulate_devices(count: int) -> None:
    flag = f"--xla_force_host_platform_device_count={count}"
    if "jax" in sys.modules:
        import jax
        if jax.device_count() != count:
            from uniecg_jax.errors import UniECGError
            raise UniECGError(f"--devices {count}: JAX already started with {jax.device_count()} "
                              f"devices; set XLA_FLAGS={flag} in the environment instead")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run(args) -> int:
    if args.devices:
        _simulate_devices(args.devices)
    import json

    from uniecg_jax.config import load_config
    from uniecg_jax.train import build_task
    from uniecg_jax.train.loop import dry_run

    config = load_config(args.config, args.config_overrides)
    report = dry_run(config, build_task(config))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"dry run: {args.config} on mesh {report['mesh']} ({report['devices']} "
          f"{report['platform']} devices), global batch {report['global_batch']} x grad_accum "
          f"{report['grad_accum_steps']}")
    print(f"  parameters            {report['num_params'] / 1e9:9.3f} B")
    print(f"  train state (global)  {_gib(report['train_state_bytes_total'])}  "
          "(f32 params + optimizer state)")
    print(f"  model FLOPs / step    {report['model_flops_per_step']:.3e}  (6N + attention, all devices)")
    scan_note = ("  (cost_analysis counts the grad-accumulation scan body once)"
                 if report["grad_accum_steps"] > 1 else "")
    print(f"  compiler FLOPs / dev  {report['compiler_flops_per_device']:.3e}{scan_note}")
    if "argument_bytes" in report:
        print("  per-device memory (compiled.memory_analysis()):")
        print(f"    arguments           {_gib(report['argument_bytes'])}")
        print(f"    outputs             {_gib(report['output_bytes'])}")
        print(f"    aliased (donated)   {_gib(report['alias_bytes'])}")
        print(f"    temporaries         {_gib(report['temp_bytes'])}")
        print(f"    generated code      {_gib(report['generated_code_bytes'])}")
        print(f"    peak estimate       {_gib(report['peak_estimate_bytes'])}  "
              "(args + outputs - aliased + temps + code)")
    print(f"  lower {report['lower_s']:.1f} s, compile {report['compile_s']:.1f} s")
    return 0
