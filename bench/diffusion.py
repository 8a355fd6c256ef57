"""Text-to-ECG diffusion benchmark: training throughput, sampling speed, DDIM vs DDPM fidelity.

    python bench/diffusion.py                                   # tiny + diffusets sizes (~15 min, 2 cores)
    python bench/diffusion.py --sizes tiny --batches 1,8        # smoke run
    python bench/diffusion.py --demo-workdir /tmp/demo/diffusion  # + HR MAE on the demo model
    python bench/diffusion.py --torch --skip-train --skip-sample --batch 16  # vs DiffuSETS torch

On one device (plain local jit, donated state):
  1. training steps/s and ECGs/s: VAE step and UNet step (UNet on latents of the frozen VAE encoder,
     the config's epsilon or v MSE + condition dropout), each forward + backward + AdamW;
  2. sampling ECGs/s (text condition -> latent -> VAE decode) for DDPM-1000 and DDIM-50 at each batch
     size. The UNet pass per denoising step is measured from DDIM-10 and DDIM-50 runs
     (t(s) = decode + s * step); DDPM-1000 is timed in full where `--full-ddpm` allows (tiny by
     default) and otherwise extrapolated as decode + 1000 * step (printed as "extrapolated");
  3. `--torch` (DiffuSETS config only): against DiffuSETS's own PyTorch code with the same random
     weights (`tests/diffusets_torch_reference.py`, converted by `uniecg_jax.convert.diffusets`),
     in the same run and on the same cores: one UNet call, one VAE decode with each conv algorithm
     (`model.vae.conv_algorithm`: direct, winograd; and their outputs' max relative difference),
     and text -> ECG end to end
     (our DDIM-50 and DDPM-1000 against DiffuSETS's default DDPM-1000, whose torch time is
     `--torch-steps` UNet + DDPM-update steps timed and extrapolated linearly to 1000, plus a decode).
     The single calls take turns (best of `--torch-rounds`) and report wall and process CPU time;
     for a comparison of the work that other processes' load barely moves, pin both libraries to
     one core (XLA sizes its pool by the affinity mask; --xla_cpu_multi_thread_eigen=false still
     runs 2 threads): `taskset -c 0 python bench/diffusion.py --torch ... --torch-threads 1`
     (AVX2-only: XLA_FLAGS=--xla_cpu_max_isa=AVX2 ATEN_CPU_CAPABILITY=avx2);
  4. on the demo model (`uniecg_jax.demo.diffusion`, trained if --demo-workdir has none): the
     heart-rate MAE of DDPM-1000 and DDIM-50 samples at the demo's requested rates, and the speed-up.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniecg_jax.config import load_config
from uniecg_jax.demo import diffusion as demo
from uniecg_jax.diffusion import losses
from uniecg_jax.layers.conv import CONV_ALGORITHMS
from uniecg_jax.layers.params import init_params_on_host
from uniecg_jax.diffusion.pipeline import DiffusionPipeline
from uniecg_jax.diffusion.rhythm import requested_rhythm
from uniecg_jax.diffusion.schedule import NoiseSchedule
from uniecg_jax.kernels import winograd_conv
from uniecg_jax.models.vae import VAE, prepare_decoder
from uniecg_jax.train import diffusion as diffusion_train
from uniecg_jax.train import loop

FUSED = "winograd-fused"   # Winograd through kernels/winograd_conv.py

TEXT_DIM = 384


def timed(fn, repeats: int, min_seconds: float = 1.0) -> float:
    """Mean seconds per call after one warm-up (compile) call: at least `repeats` calls and at least
    `min_seconds` in total (fast calls are repeated for resolution); fn must block."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < repeats or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def interleaved_best(fns: dict, rounds: int) -> dict:
    """{name: (wall s, CPU s)}: best of `rounds` calls of each fn (after one warm-up call each),
    the fns taking turns within every round so that load drifting on a shared host hits them all
    alike. CPU s is this process's CPU time (all threads); with one thread per library it is the
    work of the call, nearly independent of other processes' load. Each fn must block."""
    for fn in fns.values():
        fn()
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def host_load() -> str:
    """The 1-minute load average against the core count and the cores this process may use."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {usable} usable here"


def size_config(size: str):
    return load_config(f"configs/diffusion.py:{size}")


def host_params(config):
    vae, unet = diffusion_train.build_models(config)
    return (vae, unet, init_params_on_host(vae, 0, *diffusion_train._vae_inputs(config)),
            init_params_on_host(unet, 1, *diffusion_train._unet_inputs(unet)))


def train_throughput(config, batch: int, repeats: int) -> dict:
    """Steps/s of the VAE step and of the UNet step (frozen VAE encoder inside) at `batch`."""
    vae, unet, vae_vars, unet_vars = host_params(config)
    rng = np.random.default_rng(0)
    data = {"ecg": jnp.asarray(rng.standard_normal((batch, 12, 1024)) * 0.3, jnp.float32),
            "text_embedding": jnp.asarray(rng.standard_normal((batch, TEXT_DIM)), jnp.float32),
            "sex": jnp.zeros((batch,)), "age": jnp.full((batch,), 60.0),
            "hr": jnp.full((batch,), 75.0)}
    if unet.cfg.rhythm_condition:
        data["rhythm"] = jnp.asarray(requested_rhythm(np.full(batch, 75.0), 10.0, 1024, seed=0))
    tx = optax.adamw(1e-4)
    out = {}
    # Batch and frozen VAE are jit arguments: closed over, XLA would constant-fold the frozen
    # encoder's convolutions away and the UNet step would look cheaper than it is.
    for name, params, loss in (
            ("vae", vae_vars, lambda p, d, frozen, r: losses.vae_loss(p, d, r, vae, config)),
            ("unet", unet_vars, lambda p, d, frozen, r: losses.diffusion_loss(
                p, d, r, unet, config, vae=vae, vae_params=frozen))):
        @jax.jit
        def step(params, opt_state, data, frozen, rng, loss=loss):
            (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, data, frozen, rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        state = {"params": params, "opt": tx.init(params), "i": 0}

        def run_step():
            state["i"] += 1
            state["params"], state["opt"], value = step(state["params"], state["opt"], data,
                                                        vae_vars, jax.random.PRNGKey(state["i"]))
            value.block_until_ready()
        start = time.perf_counter()
        run_step()
        compile_s = time.perf_counter() - start
        seconds = timed(run_step, repeats)
        out[name] = dict(step_s=seconds, ecgs_per_s=batch / seconds, compile_s=compile_s)
    return out


def sampling_speed(config, batch: int, full_ddpm: bool) -> dict:
    """ECGs/s of DDIM-50 and DDPM-1000 (timed or extrapolated) at `batch`."""
    vae, unet, vae_vars, unet_vars = host_params(config)
    pipeline = DiffusionPipeline(vae, vae_vars, unet, unet_vars,
                                 NoiseSchedule.from_config(
                                     config.diffusion))
    text = np.random.default_rng(0).standard_normal((batch, TEXT_DIM)).astype(np.float32)

    def gen(sampler, steps):
        return lambda: pipeline.generate(text, "F", 60.0, 75.0, n=1, sampler=sampler, steps=steps)
    compile_start = time.perf_counter()
    gen("ddim", 10)()
    gen("ddim", 50)()
    compile_s = time.perf_counter() - compile_start
    ddim10, ddim50 = timed(gen("ddim", 10), 1), timed(gen("ddim", 50), 1)
    per_step = max((ddim50 - ddim10) / 40, 1e-9)
    decode = max(ddim10 - 10 * per_step, 0.0)
    out = {"unet_step_s": per_step, "decode_s": decode, "ddim50_s": ddim50,
           "compile_s": compile_s}
    if full_ddpm:
        out["ddpm1000_s"] = timed(gen("ddpm", 1000), 1)
        out["ddpm1000_extrapolated"] = False
    else:
        out["ddpm1000_s"] = decode + 1000 * per_step
        out["ddpm1000_extrapolated"] = True
    out["ddim50_ecgs_per_s"] = batch / ddim50
    out["ddpm1000_ecgs_per_s"] = batch / out["ddpm1000_s"]
    out["speedup"] = out["ddpm1000_s"] / ddim50
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else `platform.processor()`) and core count."""
    name = platform.processor() or "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        name = names[0] if names else name
    return f"{name}, {os.cpu_count()} cores"


def torch_comparison(config, batch: int, torch_steps: int, full_ddpm: bool, rounds: int = 5
                     ) -> dict:
    """Seconds of one UNet call, one VAE decode and text -> ECG end to end, ours vs DiffuSETS's
    PyTorch code (`tests/diffusets_torch_reference.py`) with the same random weights. The UNet and
    decode calls are interleaved, best of `rounds`, wall and CPU seconds."""
    import torch  # optional (`uniecg_jax[torch]`); only this comparison needs it

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "tests"))
    import diffusets_torch_reference as ref  # DiffuSETS's modules, kept beside the parity tests
    from uniecg_jax.convert import diffusets

    vae, unet = diffusion_train.build_models(config)
    torch.manual_seed(0)
    torch_unet = ref.ECGconditional(steps=config.diffusion.num_steps, text_embed_dim=TEXT_DIM).eval()
    torch_decoder = ref.vae_decoder(vae.cfg.widths, vae.cfg.num_groups,
                                    vae.cfg.num_res_blocks).eval()
    unet_vars = diffusets.unet_from_torch(torch_unet.state_dict(), unet.cfg)
    vae_vars = diffusets.vae_from_torch({"decoder": torch_decoder.state_dict()}, vae.cfg)
    schedule = NoiseSchedule.from_config(config.diffusion)
    pipeline = DiffusionPipeline(vae, vae_vars, unet, unet_vars, schedule)

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((batch, 4, unet.cfg.latent_length)).astype(np.float32)
    text = rng.standard_normal((batch, TEXT_DIM)).astype(np.float32)
    scalars = {"gender": np.zeros(batch), "age": np.full(batch, 60.0), "heart rate": np.full(batch, 75.0)}
    condition = np.concatenate([text] + [v[:, None] for v in scalars.values()], -1).astype(np.float32)
    timesteps = np.full(batch, 500)
    t_latent, t_text = torch.tensor(latent), torch.tensor(text[:, None])
    t_cond = {k: torch.tensor(v, dtype=torch.float32)[:, None, None] for k, v in scalars.items()}
    t_steps = torch.tensor(timesteps)

    unet_call = jax.jit(unet.apply)
    # Our decode with each conv algorithm (same weights); the config's own is `decode_ours`.
    decode_by_algorithm = {algorithm: jax.jit(functools.partial(
        VAE(vae.cfg.replace(conv_algorithm=algorithm)).apply, method=VAE.decode))
        for algorithm in CONV_ALGORITHMS}
    decode_vars = {algorithm: vae_vars for algorithm in CONV_ALGORITHMS}
    # Winograd through the fused CPU kernel (kernels/winograd_conv.py), filters prepared once per
    # weights as the pipeline does; timed wherever it builds, whatever the calibration decided.
    if winograd_conv.eligible(vae.cfg.dtype):
        fused = VAE(vae.cfg.replace(conv_algorithm="winograd"), native_winograd=True)
        decode_by_algorithm[FUSED] = jax.jit(functools.partial(fused.apply, method=VAE.decode))
        decode_vars[FUSED] = prepare_decoder(fused, vae_vars, (batch, unet.cfg.latent_length, 4))
    j_latent, j_t, j_cond = (jnp.asarray(latent.transpose(0, 2, 1)), jnp.asarray(timesteps),
                             jnp.asarray(condition))

    def torch_unet_call():
        with torch.no_grad():
            return torch_unet(t_latent, t_steps, t_text, t_cond)

    def torch_decode():
        with torch.no_grad():
            return ref.decode(torch_decoder, t_latent)

    # DiffuSETS's utils/inference.py: every DDPMScheduler step (posterior mean + fixed-small noise).
    alphas = torch.tensor(np.asarray(schedule.alphas_cumprod), dtype=torch.float32)

    def torch_ddpm(steps: int):
        x = torch.randn(batch, 4, unet.cfg.latent_length)
        with torch.no_grad():
            for t in range(config.diffusion.num_steps - 1, config.diffusion.num_steps - 1 - steps, -1):
                eps = torch_unet(x, torch.full((batch,), t), t_text, t_cond)
                a_t, a_prev = alphas[t], alphas[t - 1] if t > 0 else torch.tensor(1.0)
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                beta = 1 - a_t / a_prev
                mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a_t)
                x = mean + ((1 - a_prev) / (1 - a_t) * beta).sqrt() * torch.randn_like(x)
        return x

    def decode_with(algorithm):
        return lambda: decode_by_algorithm[algorithm](decode_vars[algorithm],
                                                      j_latent).block_until_ready()

    best = interleaved_best({
        "unet_ours": lambda: unet_call(unet_vars, j_latent, j_t, j_cond).block_until_ready(),
        "unet_torch": torch_unet_call,
        **{f"decode_{algorithm}_ours": decode_with(algorithm) for algorithm in decode_by_algorithm},
        "decode_torch": torch_decode}, rounds)
    out = {"load": host_load()}
    for name, (wall, cpu) in best.items():
        out[name + "_s"], out[name + "_cpu_s"] = wall, cpu
    for suffix in ("_s", "_cpu_s"):   # the config's algorithm, for the end-to-end figures
        out["decode_ours" + suffix] = out[f"decode_{vae.cfg.conv_algorithm}_ours{suffix}"]
    decoded = {a: np.asarray(fn(decode_vars[a], j_latent)) for a, fn in decode_by_algorithm.items()}
    out["decoders"] = list(decode_by_algorithm)
    for algorithm in decode_by_algorithm:
        out[f"{algorithm}_vs_direct"] = float(np.abs(decoded[algorithm] - decoded["direct"]).max()
                                              / np.abs(decoded["direct"]).max())
    # How far from this host's f32 peak each decoder runs: FLOPs of one decode (XLA's cost analysis;
    # torch's FlopCounterMode: DiffuSETS convolves the upsampled signal, 1.5x the MACs of our
    # polyphase form there) over its best time, and the fastest each could be at the peak: for
    # Winograd, the time above that floor is the elementwise passes (GroupNorm, SiLU, transforms).
    from torch.utils.flop_counter import FlopCounterMode
    for algorithm in decode_by_algorithm:   # the fused kernel's custom calls report no FLOPs:
        counted = "winograd" if algorithm == FUSED else algorithm   # the same algorithm's
        out[f"decode_{algorithm}_ours_flops"] = decode_by_algorithm[counted].lower(
            decode_vars[counted], j_latent).compile().cost_analysis()["flops"]
    with FlopCounterMode(display=False) as counter:
        torch_decode()
    out["decode_torch_flops"] = counter.get_total_flops()
    out["f32_peak_flops"] = loop.measure_cpu_peak_flops(size=2048, dtype="f32")

    def ours(sampler, steps):
        return lambda: pipeline.generate(text, "F", 60.0, 75.0, sampler=sampler, steps=steps)
    out["ddim50_ours_s"] = timed(ours("ddim", 50), 1, 0.0)
    if full_ddpm:
        out["ddpm1000_ours_s"] = timed(ours("ddpm", 1000), 1, 0.0)
    else:   # decode + 1000 UNet steps, the step from DDIM-50 minus its decode
        out["ddpm1000_ours_s"] = out["decode_ours_s"] + 1000 * max(
            (out["ddim50_ours_s"] - out["decode_ours_s"]) / 50, 0.0)
    out["ddpm1000_ours_extrapolated"] = not full_ddpm
    per_step = timed(lambda: torch_ddpm(torch_steps), 1, 0.0) / torch_steps
    out["ddpm1000_torch_s"] = 1000 * per_step + out["decode_torch_s"]
    out["load_after"] = host_load()
    return out


def demo_fidelity(workdir: str, n: int) -> dict:
    """HR MAE of DDPM-1000 vs DDIM-50 samples on the demo model (trained here if missing)."""
    from uniecg_jax.diffusion.pipeline import load_pipeline

    if not os.path.isfile(os.path.join(workdir, "model", "config.json")):
        for line in demo.run_demo(workdir, quick=False):
            print(line, flush=True)
    pipeline, config = load_pipeline(workdir)
    out = {}
    for sampler, steps in (("ddim", 50), ("ddpm", 1000)):
        out[f"{sampler}{steps}"] = demo.hr_mae_at_rates(pipeline, config, demo.REQUESTED_RATES,
                                                        guidance=demo.GUIDANCE, sampler=sampler,
                                                        steps=steps, n=n)
        # The first call compiled; time a second one.
        start = time.perf_counter()
        demo.hr_mae_at_rates(pipeline, config, demo.REQUESTED_RATES, guidance=demo.GUIDANCE,
                             sampler=sampler, steps=steps, n=n, seed=1)
        out[f"{sampler}{steps}"]["seconds"] = time.perf_counter() - start
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,diffusets")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--full-ddpm", default="tiny",
                        help="sizes whose DDPM-1000 is timed in full (others extrapolated)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-sample", action="store_true")
    parser.add_argument("--torch", action="store_true",
                        help="compare with DiffuSETS's PyTorch code (diffusets size only)")
    parser.add_argument("--batch", type=int, default=16, help="batch of the --torch comparison")
    parser.add_argument("--torch-steps", type=int, default=20,
                        help="torch DDPM steps timed and extrapolated to 1000")
    parser.add_argument("--torch-rounds", type=int, default=5,
                        help="interleaved rounds of the --torch UNet and decode calls (best of)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads (0: torch's default). On a loaded host torch's "
                        "OpenMP threads spin against each other (UNet batch 2: 4 s with 2 threads, "
                        "0.1 s with 1 on a 2-core box at load 5): compare on a quiet host")
    parser.add_argument("--demo-workdir", default=None)
    parser.add_argument("--demo-n", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.devices()[0].platform})",
          flush=True)
    print(f"cpu: {cpu_model()}", flush=True)
    for size in args.sizes.split(","):
        config = size_config(size)
        with config.unlocked():
            config.text.embed_dim = TEXT_DIM
        if not args.skip_train:
            result = train_throughput(config, args.train_batch, args.train_repeats)
            for name, r in result.items():
                print(f"[{size}] train {name:<4} batch {args.train_batch}: {r['step_s'] * 1e3:8.1f} "
                      f"ms/step  {r['ecgs_per_s']:7.1f} ECGs/s  (compile {r['compile_s']:.0f} s)",
                      flush=True)
        for batch in (int(b) for b in args.batches.split(",") if not args.skip_sample):
            r = sampling_speed(config, batch, size in args.full_ddpm.split(","))
            tag = " (extrapolated)" if r["ddpm1000_extrapolated"] else ""
            print(f"[{size}] sample batch {batch:>3}: UNet step {r['unet_step_s'] * 1e3:.1f} ms, "
                  f"decode {r['decode_s'] * 1e3:.0f} ms | DDIM-50 {r['ddim50_s']:.2f} s = "
                  f"{r['ddim50_ecgs_per_s']:.2f} ECGs/s | DDPM-1000 {r['ddpm1000_s']:.1f} s{tag} = "
                  f"{r['ddpm1000_ecgs_per_s']:.3f} ECGs/s | speed-up {r['speedup']:.1f}x", flush=True)
        if args.torch and size == "diffusets":
            import torch  # optional; only for its thread count
            if args.torch_threads:
                torch.set_num_threads(args.torch_threads)
            r = torch_comparison(config, args.batch, args.torch_steps,
                                 size in args.full_ddpm.split(","), args.torch_rounds)
            print(f"[{size}] vs DiffuSETS torch (same weights, batch {args.batch}, torch "
                  f"{torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}"
                  f"; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {r['load']}):", flush=True)
            for name, ours_key, torch_key in [("unet", "unet_ours", "unet_torch")] + [
                    (f"decode {a}", f"decode_{a}_ours", "decode_torch") for a in r["decoders"]]:
                ours, theirs = r[ours_key + "_s"], r[torch_key + "_s"]
                ours_cpu, theirs_cpu = r[ours_key + "_cpu_s"], r[torch_key + "_cpu_s"]
                print(f"  one {name:<15} call (best of {args.torch_rounds}, interleaved): ours "
                      f"{ours * 1e3:8.1f} ms, torch {theirs * 1e3:8.1f} ms -> {theirs / ours:.2f}x "
                      f"wall | CPU {ours_cpu * 1e3:.0f} vs {theirs_cpu * 1e3:.0f} ms -> "
                      f"{theirs_cpu / ours_cpu:.2f}x", flush=True)
            for a in r["decoders"][1:]:
                print(f"  decode {a} vs direct: max |difference| / max |direct| "
                      f"{r[f'{a}_vs_direct']:.1e}", flush=True)
            peak, torch_s = r["f32_peak_flops"], r["decode_torch_s"]
            print(f"  decode FLOPs against this host's f32 matmul peak {peak / 1e9:.0f} GFLOP/s: "
                  f"torch {r['decode_torch_flops'] / 1e9:.1f} G at "
                  f"{r['decode_torch_flops'] / torch_s / 1e9:.0f} GFLOP/s", flush=True)
            for algorithm in r["decoders"]:
                flops, took = r[f"decode_{algorithm}_ours_flops"], r[f"decode_{algorithm}_ours_s"]
                print(f"    ours {algorithm:<14} {flops / 1e9:6.1f} G at {flops / took / 1e9:3.0f} "
                      f"GFLOP/s; at the peak it would take {flops / peak * 1e3:4.0f} ms = "
                      f"{torch_s * peak / flops:.2f}x torch (the most f32 can give); "
                      f"{1 - flops / peak / took:.0%} of its time is above that floor",
                      flush=True)
            tag = " (extrapolated)" if r["ddpm1000_ours_extrapolated"] else ""
            print(f"  text -> ECG: torch DDPM-1000 {r['ddpm1000_torch_s']:.1f} s (extrapolated from "
                  f"{args.torch_steps} steps) | ours DDPM-1000 {r['ddpm1000_ours_s']:.1f} s{tag} -> "
                  f"{r['ddpm1000_torch_s'] / r['ddpm1000_ours_s']:.2f}x | ours DDIM-50 "
                  f"{r['ddim50_ours_s']:.2f} s -> {r['ddpm1000_torch_s'] / r['ddim50_ours_s']:.1f}x",
                  flush=True)
            print(f"  (default sampler of configs/diffusion.py:{size}: {config.sample.sampler}-"
                  f"{config.sample.steps}; {r['load_after']} at the end)", flush=True)
    if args.demo_workdir:
        r = demo_fidelity(args.demo_workdir, args.demo_n)
        for name, score in r.items():
            print(f"[demo model] {name}, guidance {demo.GUIDANCE:g}: HR MAE {score['hr_mae']:.1f} "
                  f"bpm ({score['undetected']} undetected) over {len(score['detected_hr'])} ECGs, "
                  f"{score['seconds']:.1f} s", flush=True)
        print(f"[demo model] DDIM-50 speed-up over DDPM-1000: "
              f"{r['ddpm1000']['seconds'] / r['ddim50']['seconds']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
