"""End-to-end text -> ECG latency through the unified model, with the share of each part.

    python bench/unified.py                                   # stage2 demo LLM + diffusion tiny
    python bench/unified.py --stage2 tiny --diffusion diffusets --batches 1 8

Parts, each jitted and timed after a warm-up call (median of --repeats):
  llm_tokens:  prefill + the decision read-out at the first answer token (`chat.decision_hook`,
               for a config with `model.decision`) + KV-cached greedy decode of the N [ECG] tokens
               + eos (forced length N + 1), keeping the hidden states (as `UnifiedModel.chat` does)
  projector:   [ECG] gather from those hidden states and the alignment head -> condition vectors
  ddim:        DDIM-50 latent sampling (conditional UNet, guidance 1)
  vae_decode:  latents -> 12 x 1024 signals
Random weights (latency does not depend on them). Prints one line per batch size.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage2", default="demo", help="configs/stage2.py variant")
    parser.add_argument("--diffusion", default="tiny", help="configs/diffusion.py variant")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import flax.linen as nn

    from uniecg_jax.inference import decoding
    from uniecg_jax.config import load_config
    from uniecg_jax.layers.params import init_params_on_host
    from uniecg_jax.diffusion.pipeline import DiffusionPipeline
    from uniecg_jax.models.llm import Decoder
    from uniecg_jax.models.unet import ConditionalUNet, UNetConfig
    from uniecg_jax.models.stage2 import build_stage2, init_stage2_params
    from uniecg_jax.models.vae import VAE, VAEConfig
    from uniecg_jax.train.stage2 import finalize_stage2_config
    from uniecg_jax.inference.chat import UnifiedModel, alignment_fn, decision_hook

    config = load_config(f"configs/stage2.py:{args.stage2}")
    config, tokenizer, *_ = finalize_stage2_config(config)
    model, s2cfg = build_stage2(config.model)
    params = jax.jit(lambda r: nn.meta.unbox(init_stage2_params(model, r)))(jax.random.PRNGKey(0))
    dcfg = load_config(f"configs/diffusion.py:{args.diffusion}",
                       [f"text.embed_dim={s2cfg.alignment.output_dim}"])
    unet_cfg = UNetConfig.from_config(dcfg.model.unet, dcfg.diffusion.num_steps)
    unet, vae = ConditionalUNet(unet_cfg), VAE(VAEConfig.from_config(dcfg.model.vae))
    unet_params = init_params_on_host(unet, 0, jnp.zeros((1, unet_cfg.latent_length, 4)),
                                      jnp.zeros((1,), jnp.int32),
                                      jnp.zeros((1, unet_cfg.condition_dim)))
    vae_params = init_params_on_host(vae, 1, jnp.zeros((1, 1024, 12)))
    pipeline = DiffusionPipeline.from_config(dcfg, vae_params, unet_params)
    unified = UnifiedModel(model, params, tokenizer, config, pipeline)
    llm_cfg = s2cfg.unified.llm
    new_tokens = s2cfg.num_ecg_tokens + 1
    request = ("Generate a 12-lead ECG that matches this report: sinus tachycardia with "
               "left axis deviation. 60-year-old woman, HR 110")
    print(f"# device {jax.devices()[0].device_kind} x{jax.device_count()}; stage2:{args.stage2} "
          f"LLM {llm_cfg.num_params() / 1e6:.1f}M, {s2cfg.num_ecg_tokens} [ECG] tokens, alignment "
          f"{s2cfg.alignment.kind}; diffusion:{args.diffusion}; DDIM-{args.steps}")
    decoder = Decoder(llm_cfg)
    generate = decoding.generate_fn(decoder, new_tokens, decoding.Sampling(), (), llm_cfg.pad_token_id,
                                    return_hidden=True, first_token_hook=decision_hook(model))
    align = alignment_fn(model)
    vae_decode = jax.jit(lambda p, z: vae.apply(p, z, method=VAE.decode))
    for batch in args.batches:
        ids, mask = decoding.left_pad([unified.text_prompt_ids(request)] * batch,
                                      llm_cfg.pad_token_id)
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        rng = jax.random.PRNGKey(0)
        # Force the answer to be the [ECG] tokens (random weights would emit anything).
        answer = jnp.asarray(np.tile(list(s2cfg.ecg_token_ids) + [llm_cfg.eos_token_id], (batch, 1)))
        full_ids = jnp.concatenate([ids, answer], 1)
        hidden = generate(params["llm"], ids, mask, None, None, rng, params).hidden
        condition, _ = align(params, hidden, full_ids)
        cond = jnp.concatenate([condition, jnp.tile(jnp.asarray([[0.0, 60.0, 110.0]]), (batch, 1))],
                               1)
        sampler = pipeline._sampler("ddim", args.steps, 1.0, 0.0, decode=False)
        # Beat-phase features at the requested rate for a rhythm-conditioned UNet, else None.
        rhythm = pipeline.rhythm_for(np.full(batch, 110.0), seed=0)
        rhythm = None if rhythm is None else jnp.asarray(rhythm)
        latents = sampler(unet_params, vae_params, cond, rhythm, rng)
        parts = {
            "llm_tokens": timed(lambda: generate(params["llm"], ids, mask, None, None, rng, params),
                                args.repeats),
            "projector": timed(lambda: align(params, hidden, full_ids), args.repeats),
            "ddim": timed(lambda: sampler(unet_params, vae_params, cond, rhythm, rng),
                          args.repeats),
            "vae_decode": timed(lambda: vae_decode(vae_params, latents), args.repeats),
        }
        total = sum(parts.values())
        shares = ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts.items())
        print(f"batch {batch}: text->ECG {total * 1e3:.1f} ms ({total / batch * 1e3:.1f} ms/ECG); "
              f"{shares}")


if __name__ == "__main__":
    main()
