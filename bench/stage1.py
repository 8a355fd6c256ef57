"""Stage-1 benchmark: training throughput + MFU and interpretation latency/throughput.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/stage1.py               # tiny + ~100M
    python bench/stage1.py --configs tiny --train-steps 3 --new-tokens 8       # smoke run

For each config, in one run on one device:
  1. the matmul peak of this device (the fastest bf16 matmul, best of 7; and f32);
  2. training: the real sharded train step of `uniecg train` (UniECG forward + backward + AdamW,
     loss on assistant tokens) on fixed random batches: ECGs/s, tokens/s (ECG + text positions) and
     model-FLOPs utilisation against the bf16 peak of (1);
  3. interpretation: `Interpreter.interpret` (ECG encoder + prefill + on-device decode loop) at batch 1
     and 8 for a fixed number of new tokens (no early stop): latency per batch and ECGs/s.
Configs: `tiny` (configs/stage1.py:tiny) and `100m` (configs/stage1.py:small with a 640-wide,
12-layer LLM: ~100M parameters, bf16 compute, 512 text tokens + 101 ECG tokens).
"""
from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from uniecg_jax import sharding
from uniecg_jax.config import load_config
from uniecg_jax.inference.interpret import Interpreter
from uniecg_jax.train import build_task, optim, state as state_lib, step as step_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import matmul_peak, timed  # noqa: E402

CONFIGS = {
    "tiny": ("configs/stage1.py:tiny", []),
    "100m": ("configs/stage1.py:small", ["model.llm.hidden_size=640", "model.llm.num_layers=12",
                                         "model.llm.intermediate_size=1728",
                                         "model.llm.num_heads=10", "model.llm.num_kv_heads=10",
                                         "model.projector.llm_hidden_size=640",
                                         "data.max_length=512", "train.batch_size=4",
                                         "model.llm.remat=none"]),
}


def random_batch(config, task, batch_size: int) -> dict:
    """A stage-1 batch of the right shapes: random ECGs, random text, placeholder at 8, the second
    half of each row as the assistant answer (loss)."""
    rng = np.random.default_rng(0)
    length = int(config.data.max_length)
    vocab = int(config.model.llm.vocab_size)
    ids = rng.integers(5, vocab, size=(batch_size, length)).astype(np.int32)
    ids[:, 8] = task.tokenizer.convert_tokens_to_ids("<ecg>")
    loss_mask = np.zeros_like(ids)
    loss_mask[:, length // 2:] = 1
    return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": np.ones_like(ids),
            "ecg": rng.normal(size=(batch_size, 12, 5000)).astype(np.float32),
            "ecg_position": np.full((batch_size,), 8, np.int32)}


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


def bench_interpretation(config, task, params, new_tokens: int, batches: tuple[int, ...]) -> dict:
    from uniecg_jax.models.stage1 import build_unified

    model, _ = build_unified(config.model)
    interpreter = Interpreter(model, params, task.tokenizer, config)
    rng = np.random.default_rng(1)
    results = {}
    for batch in batches:
        ecgs = rng.normal(size=(batch, 12, 5000)).astype(np.float32)
        seconds = timed(lambda: interpreter.interpret(ecgs, max_new_tokens=new_tokens,
                                                      stop_token_ids=()), 2)
        results[batch] = {"latency_s": seconds, "ecgs_per_s": batch / seconds,
                          "new_tokens_per_s": batch * new_tokens / seconds}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,100m")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    device = jax.devices()[0]
    peak = matmul_peak()
    print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s)")
    print(f"matmul peak: f32 {peak['f32'] / 1e9:,.0f} GFLOP/s, bf16 x bf16 -> f32 "
          f"{peak['bf16'] / 1e9:,.0f} GFLOP/s (MFU is against the bf16 figure)")
    for name in args.configs.split(","):
        spec, overrides = CONFIGS[name]
        config = load_config(spec, overrides)
        task = build_task(config)
        config = task.config  # finalised (vocabulary and special ids from the tokenizer)
        train = bench_training(config, task, args.train_steps, peak["bf16"])
        positions = task.tokens_per_step // int(config.train.batch_size)
        print(f"[{name}] {train['params'] / 1e6:.1f}M params, batch {config.train.batch_size} x "
              f"{positions} positions (the <ecg> placeholder of {config.data.max_length} text "
              f"tokens expanded to the ECG tokens), compute {config.model.llm.dtype}")
        print(f"[{name}] train: {train['step_s'] * 1e3:,.0f} ms/step, {train['ecgs_per_s']:,.2f} "
              f"ECGs/s, {train['tokens_per_s']:,.0f} tokens/s, MFU {train['mfu']:.1%}")
        params = jax.device_get(nn.meta.unbox(train.pop("state").params))
        for batch, r in bench_interpretation(config, task, params, args.new_tokens,
                                             (1, 8)).items():
            print(f"[{name}] interpret batch {batch}: {r['latency_s'] * 1e3:,.0f} ms for "
                  f"{args.new_tokens} new tokens ({r['ecgs_per_s']:,.2f} ECGs/s, "
                  f"{r['new_tokens_per_s']:,.0f} new tokens/s)")


if __name__ == "__main__":
    main()
