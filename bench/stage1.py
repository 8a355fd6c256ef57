"""Stage-1 benchmark: training throughput + MFU and interpretation latency/throughput, per input
kind for models with an image tower, the page renderer against the step, and the CLIP tower's share.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/stage1.py               # tiny + ~100M
    python bench/stage1.py --configs tiny --train-steps 3 --new-tokens 8       # smoke run
    python bench/stage1.py --configs demo,demo_image,small,small_image --tower vit_l14_336
    python bench/stage1.py --configs demo_tower,demo_image,demo_image_frozen   # the demo's image path

For each config, in one run on one device:
  1. the matmul peak of this device (the fastest bf16 matmul, best of 7; and f32);
  2. training: the real sharded train step of `uniecg train` (UniECG forward + backward + AdamW,
     loss on assistant tokens) on fixed random batches: ECGs/s, tokens/s (ECG + text positions) and
     model-FLOPs utilisation against the bf16 peak of (1);
  3. interpretation: `Interpreter.interpret` (ECG encoder + prefill + on-device decode loop) at batch 1
     and 8 for a fixed number of new tokens (no early stop): latency per batch and ECGs/s; with an
     image tower once per input kind (signal / image / both; the same compiled program);
  4. image-tower configs: the training loader's page renderer (`data.multimodal.ecg_pixels` at the
     config's size, dpi and distortions, one core, no memo) in images/s against the ECGs/s the
     step of (2) consumes, and the tower's forward time on the step's batch (its share of a step);
  5. `--tower NAME` (e.g. vit_l14_336): that CLIP tower's forward at its real shapes on this CPU
     (`bench/image.py`'s measurement), and its FLOP share of a configs/stage1.py:vicuna_7b step
     (frozen tower: forward only; LLM over 2048 text + ECG + image positions; ECG tower).
Configs: `tiny` (configs/stage1.py:tiny), `100m` (configs/stage1.py:small with a 640-wide,
12-layer LLM: ~100M parameters, bf16 compute, 512 text tokens + 101 ECG tokens), `demo` and
`demo_image` (the demo's shapes), `demo_image_frozen` (what `uniecg demo` trains: demo_image with
the tower frozen) and `demo_tower` (its tower's pretraining, configs/vision.py:demo: pages/s and
the renderer against them), `small` and `small_image` (small + a ViT-B/16-224-shaped tower as wide
as the ECG projector, 196 image tokens).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from uniecg_jax import sharding
from uniecg_jax.config import load_config
from uniecg_jax.data.ecg_image import PrintDistortions
from uniecg_jax.data.multimodal import ecg_pixels, render_dpi
from uniecg_jax.demo.stage1 import FROZEN_TOWER, TOWER_SPEC
from uniecg_jax.inference.interpret import INPUT_KINDS, Interpreter, ModelInputs
from uniecg_jax.models import clip_vision
from uniecg_jax.models.clip_vision import ClipVisionConfig, ClipVisionTower
from uniecg_jax.models.stage1 import build_unified
from uniecg_jax.train import build_task, optim, state as state_lib, step as step_lib
from uniecg_jax.train.lm import llm_flops_per_token
from uniecg_jax.train.stage1 import encoder_flops_per_ecg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import matmul_peak, timed  # noqa: E402
from image import bench_tower, synthetic_record  # noqa: E402

CONFIGS = {
    "tiny": ("configs/stage1.py:tiny", []),
    "100m": ("configs/stage1.py:small", ["model.llm.hidden_size=640", "model.llm.num_layers=12",
                                         "model.llm.intermediate_size=1728",
                                         "model.llm.num_heads=10", "model.llm.num_kv_heads=10",
                                         "model.projector.llm_hidden_size=640",
                                         "data.max_length=512", "train.batch_size=4",
                                         "model.llm.remat=none"]),
    "demo": ("configs/stage1.py:demo", []),
    "demo_image": ("configs/stage1.py:demo_image", []),
    # What `uniecg demo` trains: the tower pretrained (below), then frozen in stage 1.
    "demo_image_frozen": ("configs/stage1.py:demo_image", list(FROZEN_TOWER)),
    "demo_tower": (TOWER_SPEC, []),
    "small": ("configs/stage1.py:small", []),
    "small_image": ("configs/stage1.py:small", []),
}
# Configs given an image tower here (preset), as wide as their ECG projector (GEM's mm_hidden_size).
ADDED_TOWERS = {"small_image": "vit_b16_224"}


def bench_config(name: str):
    spec, overrides = CONFIGS[name]
    config = load_config(spec, overrides)
    if name in ADDED_TOWERS:
        width = int(config.model.projector.ecg_proj_dim)
        with config.unlocked():
            config.model.vision_tower = clip_vision.vision_config_dict(ADDED_TOWERS[name])
            config.model.vision_tower.update(hidden_size=width, intermediate_size=4 * width,
                                             num_heads=width // 64, dtype=config.model.llm.dtype)
    return config


def random_batch(config, task, batch_size: int) -> dict:
    """A stage-1 batch of the right shapes: random ECGs, random text, placeholder at 8, the second
    half of each row as the assistant answer (loss). The tower pretraining's: random pages and
    targets of its `abstract_batch` shapes."""
    rng = np.random.default_rng(0)
    if config.objective == "vision":
        return {key: rng.uniform(size=spec.shape).astype(spec.dtype)
                for key, spec in task.abstract_batch(batch_size).items()}
    length = int(config.data.max_length)
    vocab = int(config.model.llm.vocab_size)
    ids = rng.integers(5, vocab, size=(batch_size, length)).astype(np.int32)
    ids[:, 8] = task.tokenizer.convert_tokens_to_ids("<ecg>")
    loss_mask = np.zeros_like(ids)
    loss_mask[:, length // 2:] = 1
    batch = {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": np.ones_like(ids),
             "ecg": rng.normal(size=(batch_size, 12, 5000)).astype(np.float32),
             "ecg_position": np.full((batch_size,), 8, np.int32)}
    if config.model.get("vision_tower") is not None:
        size = int(config.model.vision_tower.image_size)
        batch.update(image=rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
                     ecg_present=np.ones(batch_size, np.int32),
                     image_present=np.ones(batch_size, np.int32))
    return batch


def bench_training(config, task, steps: int, peak: float) -> dict:
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    abstract, _ = sharding.abstract_sharded_init(task.init_params, mesh, jax.random.PRNGKey(0))
    tx, schedule, labels = optim.make_optimizer(config.train, abstract)
    _, shardings = state_lib.abstract_train_state(task.init_params, tx, mesh)
    state = state_lib.init_train_state(task.init_params, tx, mesh, jax.random.PRNGKey(0), shardings)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(task.loss_fn, tx, schedule, labels), shardings, mesh)
    batch_size = int(config.train.batch_size)
    batch = sharding.global_batch_from_host(random_batch(config, task, batch_size), mesh)
    holder = [state]

    def run():
        holder[0], metrics = train_step(holder[0], batch, jax.random.PRNGKey(0))
        jax.block_until_ready(metrics)
    seconds = timed(run, steps)
    return {"step_s": seconds, "ecgs_per_s": batch_size / seconds,
            "tokens_per_s": task.tokens_per_step / seconds,
            "mfu": task.flops_per_step / seconds / peak, "params": task.num_params,
            "state": holder[0]}


def kind_inputs(interpreter: Interpreter, kind: str, batch: int, seed: int) -> ModelInputs:
    """A random batch of one input kind (pixels random: the work does not depend on them)."""
    rng = np.random.default_rng(seed)
    ecgs = rng.normal(size=(batch, 12, 5000)).astype(np.float32)
    if not interpreter.has_image_tower:
        return interpreter.model_inputs(ecgs)
    pixels = rng.normal(size=(batch, *interpreter.model.config.image_shape)).astype(np.float32)
    return interpreter.model_inputs(None if kind == "image" else ecgs,
                                    None if kind == "signal" else pixels,
                                    render_missing_images=False)


def bench_interpretation(config, task, params, new_tokens: int, batches: tuple[int, ...]) -> dict:
    """{(kind, batch): latency / throughput} of `Interpreter.interpret` (no early stop)."""
    model, _ = build_unified(config.model)
    interpreter = Interpreter(model, params, task.tokenizer, config)
    kinds = INPUT_KINDS if interpreter.has_image_tower else ("signal",)
    results = {}
    for batch in batches:
        for kind in kinds:
            inputs = kind_inputs(interpreter, kind, batch, seed=batch)
            seconds = timed(lambda: interpreter.interpret(inputs, max_new_tokens=new_tokens,
                                                          stop_token_ids=()), 2)
            results[kind, batch] = {"latency_s": seconds, "ecgs_per_s": batch / seconds,
                                    "new_tokens_per_s": batch * new_tokens / seconds}
    return results


def bench_renderer(config, renders: int) -> dict:
    """The training loader's page -> pixels (`ecg_pixels` with the config's settings), one core,
    every call a new page (the loader memoises per record; a large dataset renders every step)."""
    vision = config.model.vision_tower
    size, aspect = int(vision.image_size), str(vision.image_aspect_ratio)
    distortions = PrintDistortions() if config.data.get("image_distortions", False) else None
    ecg = synthetic_record()
    seeds = iter(range(10 ** 9))
    seconds = timed(lambda: ecg_pixels(ecg, size, aspect, "canonical", distortions,
                                       next(seeds)), renders)
    return {"images_per_s": 1 / seconds, "dpi": render_dpi(size),
            "distorted": distortions is not None}


def print_renderer(name: str, render: dict, consumed: float, unit: str) -> None:
    """The renderer's pages/s against what a training step consumes per second."""
    ratio = render["images_per_s"] / consumed
    print(f"[{name}] renderer: {render['images_per_s']:,.2f} pages/s on one core "
          f"({render['dpi']:.0f} dpi, {'distorted' if render['distorted'] else 'clean'}, "
          f"+ CLIP preprocess) vs {consumed:,.2f} {unit}/s consumed by the step: "
          + (f"keeps up ({ratio:.1f}x)" if ratio >= 1 else
             f"the bottleneck without the per-record memo ({ratio:.2f}x: "
             f"{int(np.ceil(1 / ratio))} workers needed)"))


def bench_tower_share(config, params, batch_size: int, step_s: float) -> dict:
    """Seconds of the image tower's forward on a training batch and its share of the step."""
    vision = ClipVisionConfig.from_config(config.model.vision_tower, "model.vision_tower")
    tower = ClipVisionTower(vision)
    pixels = np.random.default_rng(2).normal(
        size=(batch_size, vision.image_size, vision.image_size, vision.num_channels))
    forward = jax.jit(lambda p, x: tower.apply({"params": p}, x))
    pixels = jax.numpy.asarray(pixels, jax.numpy.float32)
    seconds = timed(lambda: forward(params["vision_tower"], pixels).block_until_ready(), 2)
    return {"forward_s": seconds, "share": seconds / step_s}


def vicuna_7b_tower_share(tower: str) -> dict:
    """FLOP share of `tower`'s forward in one configs/stage1.py:vicuna_7b training example."""
    config = load_config("configs/stage1.py:vicuna_7b")
    vision = ClipVisionConfig(**clip_vision.VISION_PRESETS[tower])
    _, ucfg = build_unified(config.model)
    seq = int(config.data.max_length) + ucfg.num_ecg_tokens + vision.num_tokens - 1
    llm = llm_flops_per_token(config.model.llm, seq, ucfg.llm.num_params()) * seq
    ecg = encoder_flops_per_ecg(ucfg)
    image = clip_vision.forward_flops(vision)
    return {"tower_gflop": image / 1e9, "llm_gflop": llm / 1e9, "ecg_gflop": ecg / 1e9,
            "share": image / (image + llm + ecg), "positions": seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,100m", help=f"of {sorted(CONFIGS)}")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8", help="interpretation batch sizes")
    parser.add_argument("--renders", type=int, default=5, help="pages timed per image config")
    parser.add_argument("--tower", default="", help="a CLIP preset timed at its real shapes "
                        f"(of {sorted(clip_vision.VISION_PRESETS)}; '' = skip)")
    args = parser.parse_args()

    import platform
    device = jax.devices()[0]
    peak = matmul_peak()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s); "
          f"CPU {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"matmul peak: f32 {peak['f32'] / 1e9:,.0f} GFLOP/s, bf16 x bf16 -> f32 "
          f"{peak['bf16'] / 1e9:,.0f} GFLOP/s (MFU is against the bf16 figure)")
    for name in args.configs.split(","):
        config = bench_config(name)
        task = build_task(config)
        config = task.config  # finalised (vocabulary and special ids from the tokenizer)
        started = time.perf_counter()
        train = bench_training(config, task, args.train_steps, peak["bf16"])
        if config.objective == "vision":
            tower = config.model.vision_tower
            print(f"[{name}] image tower pretraining ({TOWER_SPEC}): {train['params'] / 1e6:.2f}M "
                  f"params, batch {config.train.batch_size} pages of {tower.image_size} px: "
                  f"{train['step_s'] * 1e3:,.1f} ms/step, {train['ecgs_per_s']:,.0f} pages/s, "
                  f"MFU {train['mfu']:.1%}")
            print_renderer(name, bench_renderer(config, args.renders), train["ecgs_per_s"],
                           "pages")
            continue
        positions = task.tokens_per_step // int(config.train.batch_size)
        image = config.model.get("vision_tower")
        extra = (f" + {build_unified(config.model)[1].num_image_tokens} image tokens "
                 f"({image.image_size} px)" if image is not None else "")
        print(f"[{name}] {train['params'] / 1e6:.1f}M params, batch {config.train.batch_size} x "
              f"{positions} positions (the <ecg> placeholder of {config.data.max_length} text "
              f"tokens expanded to the ECG tokens){extra}, compute {config.model.llm.dtype}")
        print(f"[{name}] train: {train['step_s'] * 1e3:,.0f} ms/step, {train['ecgs_per_s']:,.2f} "
              f"ECGs/s, {train['tokens_per_s']:,.0f} tokens/s, MFU {train['mfu']:.1%}"
              + (" (MFU counts no image positions or tower)" if image is not None else "")
              + f"; compile + {args.train_steps + 1} steps {time.perf_counter() - started:.0f} s")
        params = jax.device_get(nn.meta.unbox(train.pop("state").params))
        batches = tuple(int(b) for b in args.batches.split(","))
        for (kind, batch), r in bench_interpretation(config, task, params, args.new_tokens,
                                                     batches).items():
            print(f"[{name}] interpret {kind:6s} batch {batch}: {r['latency_s'] * 1e3:,.0f} ms "
                  f"for {args.new_tokens} new tokens ({r['ecgs_per_s']:,.2f} ECGs/s, "
                  f"{r['new_tokens_per_s']:,.0f} new tokens/s)")
        if image is None:
            continue
        print_renderer(name, bench_renderer(config, args.renders), train["ecgs_per_s"], "ECGs")
        share = bench_tower_share(config, params, int(config.train.batch_size), train["step_s"])
        print(f"[{name}] image tower forward on the batch: {share['forward_s'] * 1e3:,.0f} ms, "
              f"{share['share']:.1%} of the step")
    if args.tower:
        bench_tower(args.tower, [1], 1, peak["bf16"])
        share = vicuna_7b_tower_share(args.tower)
        print(f"[vicuna_7b + {args.tower}] FLOPs per training example: tower forward "
              f"{share['tower_gflop']:,.0f} GFLOP, LLM fwd+bwd {share['llm_gflop']:,.0f} GFLOP "
              f"over {share['positions']} positions, ECG tower {share['ecg_gflop']:,.0f} GFLOP: "
              f"the frozen tower is {share['share']:.1%} of a stage-1 step")


if __name__ == "__main__":
    main()
