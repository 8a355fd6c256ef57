"""Decoder-LLM benchmark: ours (JAX/Flax) against Hugging Face transformers PyTorch, same machine.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/llm.py            # full run (~5 min on 2 cores)
    python bench/llm.py --preset tiny --seq 64 --batch 2 --new-tokens 16 # smoke run

In one run on one config (`presets.llm("small")`, ~58M params, seq 512, batch 8 by default):
  1. matmul peak: the fastest big f32 matmul and bf16 matmul (bf16 or f32 accumulation, best of 7);
  2. training tokens/s, forward + backward + AdamW: ours vs PyTorch, f32 and bf16
     (ours: bf16 compute, f32 params; PyTorch: torch.autocast(bfloat16)); each side's best
     step over --rounds turns of --steps timed steps (after an untimed one), the sides in turn;
  3. model-FLOPs utilisation (6N + 12 L H Dh T per token) against the matmul peak of (1);
  4. decode tokens/s at batch 1 and 8 for 128 new tokens: our jitted KV-cache loop vs generate(),
     in f32 and with bf16 weights on both sides; each side's best of --decode-repeats runs, the two
     sides timed in turn (run-to-run spread on a shared 2-core host is ~10%). Where the CPU decode
     kernels are eligible (kernels.small_batch_matmul: f32, batch 1-8; kernels.decode_attention:
     f32) our loop is timed with every combination of them and of XLA's own dot and attention,
     each on its own line, and "ours" is the combination `generate`'s calibrations chose on this
     CPU (printed with its model and AVX2 / AVX-512 / AMX flags: the kernels' speed depends on
     them, issue 19); the "XLA's dot and attention" line is always there.
An AVX2-only host's code paths on a newer CPU (issue 19: the kernel's tuning depends on the ISA):
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 ATEN_CPU_CAPABILITY=avx2 UNIECG_KERNEL_MARCH=x86-64-v3 \
        python bench/llm.py
caps XLA's, PyTorch's and the kernel's instruction sets alike (the CPU line names the caps).
The train step is a plain local jit (value_and_grad + optax.adamw, donated state) on one device.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from uniecg_jax.inference import decoding
from uniecg_jax.kernels import decode_attention, small_batch_matmul
from uniecg_jax.models import presets
from uniecg_jax.models.llm import Decoder, LLMConfig
from uniecg_jax.train.lm import next_token_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_best, matmul_peak  # noqa: E402


def flops_per_token(config: LLMConfig, seq: int) -> float:
    matmul_params = config.num_params() - (0 if config.tie_word_embeddings
                                           else config.vocab_size * config.hidden_size)
    return 6.0 * matmul_params + 12 * config.num_layers * config.num_heads * \
        config.resolved_head_dim * seq


def ours_train_step(config: LLMConfig, batch: int, seq: int):
    """A blocking callable: one jitted train step (value_and_grad + AdamW, donated state)."""
    model = Decoder(config)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)))
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids[:1, :8])["params"])()
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    tx = optax.adamw(3e-4, weight_decay=0.01)
    opt_state = tx.init(params)

    def loss_fn(params, ids):  # the objective `uniecg train` runs (HF's side: labels=ids)
        logits = model.apply({"params": params}, ids[:, :-1])
        return next_token_loss(logits, ids[:, 1:], jnp.ones_like(ids[:, 1:]))[0]

    def train_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    step = jax.jit(train_step, donate_argnums=(0, 1))
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = step(state[0], state[1], ids)
        loss.block_until_ready()
    return run


def torch_train_step(config: LLMConfig, batch: int, seq: int, bf16: bool):
    """A blocking callable: one HF Llama train step (forward, backward, AdamW)."""
    import torch
    import transformers
    from uniecg_jax.convert.hf_llm import hf_config_from_model
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config_from_model(config)).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    ids = torch.randint(0, config.vocab_size, (batch, seq))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def decode_tokens_per_s(config: LLMConfig, batch: int, prompt: int, new_tokens: int,
                        bf16: bool = False, repeats: int = 3
                        ) -> tuple[dict[str, float], dict[str, bool]]:
    """New tokens per second, greedy, same random weights, for "hf" (generate()) and our loop with
    every combination of the CPU decode kernels that is eligible here: "xla" (XLA's dot and
    attention), "matmul" (kernels.small_batch_matmul), "attention" (kernels.decode_attention),
    "matmul+attention"; "ours" is the combination the calibrations chose (what generate does by
    default). f32, or bf16 weights and activations on both sides (ours: param_dtype = dtype =
    bfloat16, f32 accumulation; PyTorch: the model cast with `.to(torch.bfloat16)`). Each one's
    best of `repeats` runs, timed in turn.
    Returns (rates, {kernel: the calibration's choice} for the eligible kernels)."""
    import torch
    import transformers
    from uniecg_jax.convert.hf_llm import hf_config_from_model, hf_state_dict
    model = Decoder(config)
    ids = np.random.RandomState(1).randint(3, config.vocab_size, (batch, prompt))
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(ids[:, :8]))["params"])()
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    if bf16:
        model = Decoder(dataclasses.replace(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
        params_f32, params = params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    cfg = model.config

    def ours(matmul: bool, attention: bool):
        out = decoding.generate(model, params, ids, max_new_tokens=new_tokens, stop_token_ids=(),
                                small_batch_kernel=matmul, attention_kernel=attention)
        out.tokens.block_until_ready()
    # What generate(small_batch_kernel=None, attention_kernel=None) decides (each kernel measured
    # at first use, then cached), and which kernels can run here at all.
    chosen = dict(zip(("matmul", "attention"),
                      decoding.decode_kernels(model, params, jnp.asarray(ids))))
    choice = {}
    if small_batch_matmul.eligible(cfg.compute_dtype, cfg.params_dtype, batch, params):
        choice["matmul"] = chosen["matmul"]
    if decode_attention.eligible(cfg.compute_dtype, cfg.resolved_head_dim, params):
        choice["attention"] = chosen["attention"]
    runs = {}
    for matmul in ((False, True) if "matmul" in choice else (False,)):
        for attention in ((False, True) if "attention" in choice else (False,)):
            name = "+".join(k for k, on in (("matmul", matmul), ("attention", attention)) if on)
            runs[name or "xla"] = functools.partial(ours, matmul, attention)

    hf_model = transformers.LlamaForCausalLM(hf_config_from_model(config)).float().eval()
    with torch.no_grad():
        state = {name: torch.from_numpy(np.asarray(t, np.float32).copy())
                 for name, t in hf_state_dict(params_f32 if bf16 else params, config)}
        hf_model.load_state_dict(state, strict=False)
    if bf16:
        hf_model = hf_model.to(torch.bfloat16)

    def hf():
        with torch.no_grad():
            hf_model.generate(torch.tensor(ids), attention_mask=torch.ones(batch, prompt,
                                                                           dtype=torch.long),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
    best = interleaved_best({**runs, "hf": hf}, repeats)
    rates = {name: batch * new_tokens / seconds for name, seconds in best.items()}
    rates["ours"] = rates["+".join(k for k, on in chosen.items() if on) or "xla"]
    return rates, choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2,
                        help="timed train steps per turn (best taken)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="turns per side in training, ours and PyTorch alternating")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=3,
                        help="timed decode runs per side (best taken)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--dtypes", default="f32,bf16",
                        help="rows to run: f32, bf16 or both (PyTorch's bf16 attention fails "
                             "under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU: use f32 there)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)

    base = presets.llm(args.preset)
    base.max_position_embeddings = max(base.max_position_embeddings, args.seq + args.new_tokens)
    config = LLMConfig.from_config(base)
    bf16 = LLMConfig.from_config({**base.to_dict(), "dtype": "bfloat16"})
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    isa = ", ".join(small_batch_matmul.cpu_isa()) or "none of AVX2 / AVX-512 / AMX"
    caps = small_batch_matmul.isa_caps()
    capped = ("; code paths capped: " + ", ".join(f"{tool} {cap}" for tool, cap in caps.items())
              if caps else "")
    print(f"CPU: {small_batch_matmul.cpu_model()} ({isa}), {os.cpu_count()} cores{capped}")
    print(f"model: preset {args.preset}, {config.num_params() / 1e6:.1f}M params, "
          f"seq {args.seq}, batch {args.batch}")
    hugetlb = "hugetlb" in os.environ.get("GLIBC_TUNABLES", "")
    print(f"GLIBC_TUNABLES=glibc.malloc.hugetlb=1 is {'on' if hugetlb else 'OFF'} "
          "(it gave ~+20% to both frameworks on this machine)")
    print(f"host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(other processes sharing the cores scale both frameworks' figures down)")

    peak = matmul_peak()
    print(f"matmul peak: f32 {peak['f32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")

    fpt = flops_per_token(config, args.seq)
    rows = []
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"f32", "bf16"}:
        parser.error(f"--dtypes {args.dtypes!r}: expected f32, bf16 or f32,bf16")
    for name, cfg, torch_bf16, peak_key in (("f32", config, False, "f32"),
                                           ("bf16", bf16, True, "bf16")):
        if name not in dtypes:
            continue
        steps = {"ours": ours_train_step(cfg, args.batch, args.seq)}
        if not args.skip_torch:
            steps["torch"] = torch_train_step(config, args.batch, args.seq, torch_bf16)
        best = interleaved_best(steps, args.rounds, args.steps, warm_each_turn=True)
        ours = args.batch * (args.seq - 1) / best["ours"]
        ref = args.batch * (args.seq - 1) / best["torch"] if "torch" in best else None
        mfu = ours * fpt / peak[peak_key]
        rows.append((name, ours, ref, mfu))
        ref_text = "n/a" if ref is None else f"{ref:8.0f} tok/s   ratio {ours / ref:5.2f}x"
        print(f"train {name:4s}: ours {ours:8.0f} tok/s   PyTorch {ref_text}   "
              f"MFU {100 * mfu:4.1f}% of the {peak_key} peak")

    labels = {"xla": "XLA's dot and attention", "matmul": "small_batch_matmul kernel",
              "attention": "decode_attention kernel",
              "matmul+attention": "small_batch_matmul + decode_attention kernels"}
    for dtype_name in dtypes:
        for batch in (1, 8):
            rates, choice = decode_tokens_per_s(config, batch, args.prompt, args.new_tokens,
                                                bf16=dtype_name == "bf16",
                                                repeats=args.decode_repeats)
            hf = rates["hf"]
            chose = ("" if not choice else "   [calibration chose: " + ", ".join(
                f"{kernel} {'kernel' if on else 'XLA'}" for kernel, on in choice.items()) + "]")
            lines = [(f"decode {dtype_name:4s} batch {batch}", rates["ours"], chose)]
            if len(rates) > 3:    # more than ours, hf and one combination: each on its own line
                lines += [(f"decode {dtype_name:4s} batch {batch}, {label}", rates[name], "")
                          for name, label in labels.items() if name in rates]
            for label, ours, note in lines:
                print(f"{label}: ours {ours:8.0f} tok/s   generate() {hf:8.0f} tok/s   ratio "
                      f"{ours / hf:5.2f}x   ({args.new_tokens} new tokens, prompt {args.prompt})"
                      f"{note}")


if __name__ == "__main__":
    main()
