"""`uniecg dry-run --config configs/stage2.py:vicuna_7b --topology v5p-64 [--config.mesh.tensor=4]`.

Lowers and compiles the real train step (optimizer included) with the real shardings for the
configured mesh against abstract parameters (nothing is allocated) and prints per-device memory from
`compiled.memory_analysis()`, the parameter count and the FLOPs of one step: what to check before
renting a pod. `--topology` compiles for the chips of a Cloud TPU slice (`v5e-8`, `v5p-64`, or a
libtpu topology such as `v5e:2x2`) through libtpu on this host, no TPU attached (`pip install -e
'.[tpu]'`); those figures are the TPU compiler's plan and say whether the step fits in HBM.
Without it the step compiles for the local devices; `--devices N` simulates N CPU devices, whose
compiler ignores remat: its temporaries are not a TPU plan. `--per-device-batch N` sets
`train.batch_size` to N x data x fsdp x grad_accum_steps; `--per-device-batch max` (with
`--topology`) finds the largest power of two that fits the slice's HBM in ~3 compiles.
"""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dry-run", help="compile the train step for a mesh or TPU slice and print per-device memory",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--config", required=True, help="configs/<file>.py:<variant>")
    parser.add_argument("--topology", default="",
                        help="compile for this TPU slice through libtpu (v5e-8, v5p-64, v5e:2x2)")
    parser.add_argument("--devices", type=int, default=0,
                        help="simulate this many CPU devices (must be set before JAX starts)")
    parser.add_argument("--per-device-batch", type=_batch_arg, default=0,
                        help="set train.batch_size to this x data x fsdp x grad_accum_steps; "
                             "'max' (with --topology): the largest power of two that fits")
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


def _batch_arg(text: str):
    if text == "max":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'max', got {text!r}") from None


def _set_per_device_batch(config, per_device: int, num_devices: int) -> None:
    """train.batch_size = per_device x data x fsdp x grad_accum_steps (the mesh resolved over
    `num_devices`)."""
    from uniecg_jax.sharding import mesh_shape

    data, fsdp, _ = mesh_shape(config.mesh, num_devices)
    with config.unlocked():
        config.train.batch_size = per_device * data * fsdp * int(config.train.grad_accum_steps)


def run(args) -> int:
    from uniecg_jax.errors import UniECGError

    if args.topology and args.devices:
        raise UniECGError("--topology and --devices are exclusive (a TPU slice or simulated CPUs)")
    if args.devices:
        _simulate_devices(args.devices)
    import json

    from uniecg_jax import aot
    from uniecg_jax.config import load_config

    config = load_config(args.config, args.config_overrides)
    target = aot.resolve_target(args.topology) if args.topology else None
    devices = aot.topology_devices(target) if target else None
    if args.per_device_batch == "max":
        if target is None:
            raise UniECGError("--per-device-batch max needs --topology (a TPU slice's HBM)")
        report = largest_fitting_batch(config, target, devices)
    else:
        report = _compile(config, args.per_device_batch, target, devices)
    if args.json:
        print(json.dumps(report))
        return 0
    _print_report(args, report, target)
    return 0


def _compile(config, per_device_batch: int, target, devices) -> dict:
    """One dry run (per-device batch 0: the config's own); with a TPU target, whether it fits."""
    import jax

    from uniecg_jax.train import build_task
    from uniecg_jax.train.loop import dry_run

    if per_device_batch:
        _set_per_device_batch(config, per_device_batch,
                              len(devices) if devices else jax.device_count())
    try:
        report = dry_run(config, build_task(config), devices)
    except Exception as e:  # the TPU compiler refuses a program that exceeds HBM
        if target is None or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report = dict(fits=False, compile_error=str(e).splitlines()[0][:500])
    if target is not None:
        report.update(topology=target.topology, hbm_bytes_per_device=target.hbm_bytes)
        if "peak_estimate_bytes" in report:
            report["fits"] = report["peak_estimate_bytes"] <= target.hbm_bytes
    report["per_device_batch"] = per_device_batch or None
    return report


def largest_fitting_batch(config, target, devices, limit: int = 1024) -> dict:
    """The report of the largest power-of-two per-device batch whose step fits `target`'s HBM,
    with `tried` ({batch: peak bytes or None = refused}) and `max_per_device_batch` (0: not even
    1 fits). Compiles batch 1 and 2, extrapolates the peak linearly (activations grow with the
    batch; state does not) to the largest power of two under HBM, compiles that, and halves while
    it does not fit, so a search costs ~3 compiles rather than one per candidate."""
    tried, reports = {}, {}

    def attempt(batch):
        reports[batch] = _compile(config, batch, target, devices)
        tried[batch] = reports[batch].get("peak_estimate_bytes") if reports[batch]["fits"] else None
        return reports[batch]["fits"]

    if not attempt(1):
        best = 0
    elif not attempt(2):
        best = 1
    else:
        best, per_example = 2, max(tried[2] - tried[1], 1)
        predicted = (target.hbm_bytes - (tried[1] - per_example)) // per_example
        guess = 2
        while guess * 2 <= min(predicted, limit):
            guess *= 2
        while guess > best and not attempt(guess):
            guess //= 2
        best = guess
        # Confirm that the next power of two does not fit (doubling while the guess was low).
        while best * 2 <= limit and best * 2 not in tried and attempt(best * 2):
            best *= 2
    report = dict(reports[best or 1])
    report.update(max_per_device_batch=best, tried=tried)
    return report


def _print_report(args, report: dict, target) -> None:
    if "compile_error" in report:
        print(f"dry run: {args.config} on {target.name} ({target.topology}): does NOT fit, the TPU "
              f"compiler ran out of HBM ({_gib(target.hbm_bytes).strip()} per device):\n  "
              f"{report['compile_error']}")
        return
    where = "" if target is None else (f"{target.topology}, " if target.name == target.topology
                                        else f"{target.name} = {target.topology}, ")
    print(f"dry run: {args.config} on mesh {report['mesh']} ({where}{report['devices']} "
          f"{report['device_kind']} devices), global batch {report['global_batch']} x grad_accum "
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
        if target is not None:
            verdict = "fits" if report["fits"] else "does NOT fit"
            print(f"    HBM per device      {_gib(target.hbm_bytes)}  -> {verdict}")
        elif report["platform"] == "cpu":
            print("    (CPU compile: the temporaries are the CPU compiler's plan, which ignores "
                  "remat; they are not a TPU plan. Use --topology for TPU figures.)")
    print(f"  lower {report['lower_s']:.1f} s, compile {report['compile_s']:.1f} s")
    if "max_per_device_batch" in report:
        tried = ", ".join(f"{b}: {'refused' if peak is None else _gib(peak).strip()}"
                          for b, peak in sorted(report["tried"].items()))
        print(f"  largest per-device batch that fits: {report['max_per_device_batch']} "
              f"(powers of two; peaks tried: {tried})")
