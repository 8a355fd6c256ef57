"""Image-modality benchmark: ECG image rendering throughput and CLIP image-tower forward time.

    python bench/image.py                                          # ViT-L/14-336 + renderer
    python bench/image.py --towers tiny --batches 1 --dpi 100 --renders 2 --repeats 1   # smoke

In one run on this host:
  1. rendering (`data.ecg_image.render_ecg_image`, one CPU core): images/s of a 10 s 12-lead record
     at each `--dpi`, clean and with print distortions, and with CLIP preprocessing to the tower's
     input size added (what the data pipeline pays per example);
  2. the image tower (`models.clip_vision`, features of layer -2 as GEM): jitted forward seconds
     per batch and images/s at each `--batches`, in f32 and in bf16 compute (f32 accumulation), with
     model-FLOPs utilisation against the bf16 matmul peak measured in the same run.
Compare (1) with the ECGs/s a stage-1 step consumes (`bench/stage1.py`): the renderer keeps up when
its images/s times the data workers exceeds that rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from uniecg_jax.data.ecg_image import PrintDistortions, render_ecg_image
from uniecg_jax.data.image_preprocess import clip_preprocess
from uniecg_jax.layers.params import init_params_on_host
from uniecg_jax.models.clip_vision import VISION_PRESETS, ClipVisionConfig, ClipVisionTower, \
    forward_flops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import matmul_peak, timed  # noqa: E402

RATE = 500.0


def synthetic_record(seconds: float = 10.0) -> np.ndarray:
    """A 12-lead [12, T] record of spiky beats at 72 bpm (shape only matters for timing)."""
    time_s = np.arange(int(seconds * RATE)) / RATE
    phase = (time_s * 72 / 60) % 1.0
    beat = np.exp(-((phase - 0.3) / 0.012) ** 2) - 0.2 * np.exp(-((phase - 0.55) / 0.05) ** 2)
    gains = np.linspace(-1.0, 1.5, 12)
    return gains[:, None] * beat[None, :]


def bench_rendering(dpis: list[int], renders: int, image_size: int) -> None:
    ecg = synthetic_record()
    for dpi in dpis:
        render_ecg_image(ecg, RATE, dpi=dpi)           # draws the cached grid page once
        for label, kwargs in (("clean", {}), ("distorted", {"distortions": PrintDistortions()})):
            counter = iter(range(10 ** 9))

            def one(kwargs=kwargs):
                return render_ecg_image(ecg, RATE, dpi=dpi, seed=next(counter), **kwargs)
            seconds = timed(one, renders)
            image = one()
            with_clip = timed(lambda: clip_preprocess(one(), image_size), renders)
            print(f"render dpi={dpi} {label:9s} {image.shape[1]}x{image.shape[0]}: "
                  f"{1 / seconds:6.1f} images/s ({seconds * 1e3:6.1f} ms); + CLIP preprocess to "
                  f"{image_size}: {1 / with_clip:6.1f} images/s", flush=True)


def bench_tower(name: str, batches: list[int], repeats: int, peak: float) -> None:
    for dtype in ("float32", "bfloat16"):
        config = ClipVisionConfig(**VISION_PRESETS[name], dtype=dtype)
        tower = ClipVisionTower(config)
        shape = (1, config.image_size, config.image_size, config.num_channels)
        start = time.perf_counter()
        params = init_params_on_host(tower, 0, jnp.zeros(shape))["params"]
        init_s = time.perf_counter() - start
        forward = jax.jit(lambda p, x: tower.apply({"params": p}, x))
        for batch in batches:
            pixels = jax.random.normal(jax.random.PRNGKey(batch), (batch,) + shape[1:])
            start = time.perf_counter()
            forward(params, pixels).block_until_ready()
            compile_s = time.perf_counter() - start
            seconds = timed(lambda: forward(params, pixels).block_until_ready(), repeats)
            mfu = forward_flops(config) * batch / seconds / peak
            print(f"tower {name} {dtype:8s} batch {batch:3d}: {seconds * 1e3:8.1f} ms/batch, "
                  f"{batch / seconds:7.2f} images/s, MFU {100 * mfu:5.1f}% of bf16 peak "
                  f"({config.num_tokens} tokens x {config.hidden_size}, {config.layers_run} of "
                  f"{config.num_layers} layers; compile {compile_s:.1f} s, host init "
                  f"{init_s:.1f} s)",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--towers", default="vit_l14_336", help=f"of {sorted(VISION_PRESETS)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dpi", default="100,200")
    parser.add_argument("--renders", type=int, default=10)
    args = parser.parse_args()
    towers = [t for t in args.towers.split(",") if t]
    print(f"devices: {jax.devices()}; CPU cores: {os.cpu_count()}", flush=True)
    image_size = VISION_PRESETS[towers[0]].get("image_size", 336) if towers else 336
    bench_rendering([int(d) for d in args.dpi.split(",")], args.renders, image_size)
    peak = matmul_peak()
    print(f"matmul peak: bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s, "
          f"f32 {peak['f32'] / 1e9:.0f} GFLOP/s", flush=True)
    for name in towers:
        bench_tower(name, [int(b) for b in args.batches.split(",")], args.repeats,
                    peak["bf16"])


if __name__ == "__main__":
    main()
