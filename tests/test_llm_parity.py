"""Decoder logits parity with Hugging Face `transformers` PyTorch (random tiny Llama / Qwen2)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from uniecg_jax.convert import hf_llm, hf_testing  # noqa: E402
from uniecg_jax.models.llm import Decoder, LLMConfig  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

CASES = {
    "llama_gqa_untied": ("llama", {}),
    "llama_tied_head_dim12": ("llama", dict(head_dim=12, tie_word_embeddings=True)),
    "llama_rope_linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # max_position_embeddings below the sequence length so the dynamic NTK update kicks in.
    "llama_rope_dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 3.0},
                                         max_position_embeddings=8)),
    "llama3_rope_theta": ("llama", dict(rope_scaling=LLAMA3, rope_theta=500000.0)),
    "llama_attention_bias_mha": ("llama", dict(attention_bias=True, num_key_value_heads=4)),
    "qwen2_gqa_untied": ("qwen2", {}),
    "qwen2_tied_head_dim20": ("qwen2", dict(head_dim=20, tie_word_embeddings=True,
                                            num_key_value_heads=1)),
}


def convert(family, directory, **overrides):
    hf_model = hf_testing.tiny_hf_model(family, directory, **overrides)
    config = LLMConfig.from_config(hf_llm.model_config_from_hf(str(directory)))
    params = hf_llm.load_hf_params(str(directory), config)
    return hf_model, config, params


def hf_logits(hf_model, ids, **kwargs):
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(ids)), **kwargs).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, overrides = CASES[case]
    hf_model, config, params = convert(family, tmp_path, **overrides)
    ids = np.random.RandomState(1).randint(0, config.vocab_size, (2, 12))
    ours = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(ids)))
    ref = hf_logits(hf_model, ids)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    assert np.abs(ref).max() > 0.1  # a vacuous (all-zero) model would pass trivially


def test_padding_mask_left_and_right(tmp_path):
    hf_model, config, params = convert("llama", tmp_path)
    rng = np.random.RandomState(2)
    ids = rng.randint(4, config.vocab_size, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[0, :4] = 0   # left padding
    mask[1, 7:] = 0   # right padding
    ids = np.where(mask == 1, ids, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = hf_logits(hf_model, ids, attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    ours = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(ids),
                                            attention_mask=jnp.asarray(mask)))
    real = mask == 1
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    # Row 0 with its padding stripped equals an unpadded run.
    alone = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(ids[:1, 4:])))
    assert np.abs(alone[0] - ours[0, 4:]).max() <= 1e-5
    assert np.isfinite(ours).all()


def test_spliced_embeddings_equal_hf_inputs_embeds(tmp_path):
    hf_model, config, params = convert("qwen2", tmp_path)
    rng = np.random.RandomState(3)
    ids = rng.randint(4, config.vocab_size, (2, 10))
    extra = rng.randn(2, 3, config.hidden_size).astype(np.float32)
    extra_positions = np.array([[2, 3, 4], [6, 7, -1]], np.int32)  # -1 = unused slot
    ours = np.asarray(Decoder(config).apply(
        {"params": params}, jnp.asarray(ids), extra_embeddings=jnp.asarray(extra),
        extra_positions=jnp.asarray(extra_positions)))
    with torch.no_grad():
        embeds = hf_model.model.embed_tokens(torch.tensor(ids)).numpy().copy()
    for b in range(2):
        for n in range(3):
            if extra_positions[b, n] >= 0:
                embeds[b, extra_positions[b, n]] = extra[b, n]
    with torch.no_grad():
        ref = hf_model(inputs_embeds=torch.tensor(embeds)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    plain = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(plain[:, 2:] - ours[:, 2:]).max() > 1e-2  # the splice really changed something


def test_scan_layers_remat_and_bf16_match(tmp_path):
    hf_model, config, params = convert("llama", tmp_path, head_dim=12)
    ids = np.random.RandomState(4).randint(0, config.vocab_size, (2, 8))
    ref = hf_logits(hf_model, ids)
    import dataclasses
    scanned = dataclasses.replace(config, scan_layers=True, remat="dots_saveable")
    scanned_params = hf_llm.load_hf_params(str(tmp_path), scanned)
    assert scanned_params["layers"]["attention"]["query"]["kernel"].shape[0] == config.num_layers
    ours = np.asarray(Decoder(scanned).apply({"params": scanned_params}, jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    low = np.asarray(Decoder(bf16).apply({"params": params}, jnp.asarray(ids)))
    assert low.dtype == np.float32
    assert np.abs(low - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_causal_attention_matches_dense_and_hf(family, tmp_path):
    """Query chunks of 4 over 14 tokens (4 chunks, the last one short) with left/right padding:
    logits and gradients equal the dense [T, T] attention and HF on every real position."""
    import dataclasses

    import jax

    hf_model, config, params = convert(family, tmp_path)
    chunked = dataclasses.replace(config, attention_query_chunk=4)
    dense = dataclasses.replace(config, attention_query_chunk=0)
    rng = np.random.RandomState(5)
    ids = rng.randint(4, config.vocab_size, (2, 14))
    mask = np.ones((2, 14), np.int64)
    mask[0, :5] = 0
    mask[1, 11:] = 0
    ids = np.where(mask == 1, ids, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = hf_logits(hf_model, ids, attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    real = mask == 1

    def loss(params, cfg):
        logits = Decoder(cfg).apply({"params": params}, jnp.asarray(ids),
                                    attention_mask=jnp.asarray(mask))
        return (logits * jnp.asarray(real)[..., None]).sum() ** 2 * 1e-6, logits

    (_, ours), grads = jax.value_and_grad(loss, has_aux=True)(params, chunked)
    (_, base), base_grads = jax.value_and_grad(loss, has_aux=True)(params, dense)
    ours, base = np.asarray(ours), np.asarray(base)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    assert np.abs(ours[real] - base[real]).max() <= 1e-6
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 0
