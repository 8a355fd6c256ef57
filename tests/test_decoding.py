"""KV-cache decoding: greedy == transformers generate(do_sample=False), stops, sampling filters."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from uniecg_jax.inference import decoding  # noqa: E402
from uniecg_jax.convert import hf_llm, hf_testing  # noqa: E402
from uniecg_jax.kernels import decode_attention, native, small_batch_matmul  # noqa: E402
from uniecg_jax.models.llm import Decoder, LLMConfig  # noqa: E402

PROMPTS = [[5, 17, 42, 8, 9, 60, 33], [11, 12], [70, 71, 72, 73]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_llama")
    # eos id outside the sampled range unless a test asks for it: no early stops in the HF compare.
    hf_model = hf_testing.tiny_hf_model("llama", directory, head_dim=12, eos_token_id=95)
    config = LLMConfig.from_config(hf_llm.model_config_from_hf(str(directory)))
    params = hf_llm.load_hf_params(str(directory), config)
    return hf_model, Decoder(config), params


@pytest.mark.parametrize("small_batch_kernel", [True, False])
def test_greedy_matches_hf_generate_on_padded_batch(tiny, small_batch_kernel):
    hf_model, model, params = tiny
    if small_batch_kernel and not small_batch_matmul.load():
        pytest.skip("kernels.small_batch_matmul is not built here (no C++ compiler)")
    ids, mask = decoding.left_pad(PROMPTS, pad_token_id=0)
    max_new = 12
    out = decoding.generate(model, params, ids, mask, max_new_tokens=max_new, stop_token_ids=(),
                            small_batch_kernel=small_batch_kernel)
    ref_new = hf_greedy(hf_model, ids, mask, max_new)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_new)
    np.testing.assert_array_equal(np.asarray(out.lengths), [max_new] * len(PROMPTS))
    # Rows are independent of their batch mates and of the padding.
    alone = decoding.generate(model, params, np.array([PROMPTS[1]]), max_new_tokens=max_new,
                              stop_token_ids=())
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]), ref_new[1])


@pytest.mark.parametrize("small_batch_kernel", [True, False])
def test_greedy_with_the_attention_kernel_matches_hf_generate(tmp_path, small_batch_kernel):
    """kernels.decode_attention (head size 16, grouped queries, left padding) decodes the same
    greedy tokens as transformers, alone and beside kernels.small_batch_matmul."""
    if not decode_attention.load() or (small_batch_kernel and not small_batch_matmul.load()):
        pytest.skip("the CPU decode kernels are not built here (no C++ compiler)")
    hf_model = hf_testing.tiny_hf_model("llama", tmp_path, head_dim=16, eos_token_id=95)
    config = LLMConfig.from_config(hf_llm.model_config_from_hf(str(tmp_path)))
    assert config.num_heads > config.num_kv_heads and config.resolved_head_dim == 16
    model = Decoder(config)
    params = jax.device_put(hf_llm.load_hf_params(str(tmp_path), config), jax.devices()[0])
    ids, mask = decoding.left_pad(PROMPTS, pad_token_id=0)
    fn = decoding.generate_fn(model, 12, small_batch_kernel=small_batch_kernel,
                              attention_kernel=True)
    lowered = fn.lower(params, jnp.asarray(ids), jnp.asarray(mask), None, None,
                       jax.random.PRNGKey(0)).as_text()
    assert decode_attention.TARGET in lowered          # the kernel really runs
    out = decoding.generate(model, params, ids, mask, max_new_tokens=12, stop_token_ids=(),
                            small_batch_kernel=small_batch_kernel, attention_kernel=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_greedy(hf_model, ids, mask, 12))


def hf_greedy(hf_model, ids, mask, max_new):
    """transformers generate(do_sample=False) for the left-padded batch: new tokens [B, max_new]."""
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask, dtype=torch.long),
                                max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    return ref[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("slow_side", ["kernel", "xla"])
def test_calibrated_choice_decodes_the_same_greedy_tokens(tiny, monkeypatch, tmp_path, slow_side):
    """With the default small_batch_kernel=None, generate takes what the calibration measured
    (here made to favour one side by slowing the other) and greedy tokens equal HF's either way."""
    hf_model, model, params = tiny
    if not small_batch_matmul.load():
        pytest.skip("kernels.small_batch_matmul is not built here (no C++ compiler)")
    params = jax.device_put(params, jax.devices()[0])    # loaded replicated over the 8 test devices
    monkeypatch.setenv("UNIECG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("UNIECG_SMALL_BATCH_KERNEL", raising=False)
    monkeypatch.setattr(native, "_decisions", {})
    monkeypatch.setattr(small_batch_matmul, "CALIBRATION_DELAY_S",
                        {"kernel": 0.0, "xla": 0.0, slow_side: 0.05})
    chosen = []
    generate_fn = decoding.generate_fn

    def recording_generate_fn(*args, **kwargs):
        chosen.append(args[5])            # small_batch_kernel, as generate resolved it
        return generate_fn(*args, **kwargs)
    monkeypatch.setattr(decoding, "generate_fn", recording_generate_fn)
    ids, mask = decoding.left_pad(PROMPTS, pad_token_id=0)
    out = decoding.generate(model, params, ids, mask, max_new_tokens=12, stop_token_ids=())
    assert chosen == [slow_side == "xla"]
    assert len(list(tmp_path.glob("small_batch_matmul-choice-*.json"))) == 1
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_greedy(hf_model, ids, mask, 12))


def test_stop_tokens_end_rows_and_pad_after(tiny):
    _, model, params = tiny
    ids, mask = decoding.left_pad(PROMPTS)
    free = np.asarray(decoding.generate(model, params, ids, mask, max_new_tokens=10,
                                        stop_token_ids=()).tokens)
    # Stop on the 3rd token of row 0 and the 5th of row 1 (two different stop ids).
    stops = (int(free[0, 2]), int(free[1, 4]))
    out = decoding.generate(model, params, ids, mask, max_new_tokens=10, stop_token_ids=stops,
                            pad_token_id=0)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(3):
        hits = [k for k in range(10) if free[row, k] in stops]
        expected_len = hits[0] + 1 if hits else 10
        assert lengths[row] == expected_len
        np.testing.assert_array_equal(tokens[row, :expected_len], free[row, :expected_len])
        assert (tokens[row, expected_len:] == 0).all()


def test_top_k_one_sampling_equals_greedy(tiny):
    _, model, params = tiny
    ids, mask = decoding.left_pad(PROMPTS)
    greedy = decoding.generate(model, params, ids, mask, max_new_tokens=8, stop_token_ids=())
    sampled = decoding.generate(model, params, ids, mask, max_new_tokens=8, stop_token_ids=(),
                                sampling=decoding.Sampling(temperature=1.3, top_k=1),
                                rng=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens))


def test_top_p_keeps_only_the_nucleus():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps the first two, renormalised 0.625/0.375.
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    filtered = decoding.filter_logits(logits, decoding.Sampling(temperature=1.0, top_p=0.75))
    assert np.isinf(np.asarray(filtered)[0, [0, 2]]).all()
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = jax.vmap(lambda k: decoding.sample_tokens(
        logits, decoding.Sampling(temperature=1.0, top_p=0.75), k))(keys)[:, 0]
    counts = np.bincount(np.asarray(draws), minlength=4) / 4000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.625) < 0.03 and abs(counts[3] - 0.375) < 0.03
    # Plain temperature sampling follows softmax(logits / T).
    hot = jax.vmap(lambda k: decoding.sample_tokens(
        logits, decoding.Sampling(temperature=1.0), k))(keys)[:, 0]
    counts = np.bincount(np.asarray(hot), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.15, 0.5, 0.05, 0.3], atol=0.03)


def test_prefill_splice_and_right_padding_rejected(tiny):
    _, model, params = tiny
    ids, mask = decoding.left_pad(PROMPTS)
    embeds = np.asarray(model.apply({"params": params}, jnp.asarray(ids), method=Decoder.embed))
    # Splicing a prompt's own token embeddings back in changes nothing.
    positions = np.array([[3, 4], [5, 6], [-1, -1]], np.int32)
    extra = np.stack([embeds[b, np.maximum(positions[b], 0)] for b in range(3)])
    base = decoding.generate(model, params, ids, mask, max_new_tokens=5, stop_token_ids=())
    spliced = decoding.generate(model, params, ids, mask, max_new_tokens=5, stop_token_ids=(),
                                extra_embeddings=jnp.asarray(extra), extra_positions=positions)
    np.testing.assert_array_equal(np.asarray(base.tokens), np.asarray(spliced.tokens))
    noisy = decoding.generate(model, params, ids, mask, max_new_tokens=5, stop_token_ids=(),
                              extra_embeddings=jnp.asarray(extra) * 0 + 3.0,
                              extra_positions=positions)
    assert (np.asarray(noisy.tokens) != np.asarray(base.tokens)).any()
    with pytest.raises(ValueError, match="left-padded"):
        decoding.generate(model, params, ids, mask[:, ::-1], max_new_tokens=2)


def test_greedy_tokens_equal_argmax_with_ties_and_nans():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    logits[1, [3, 17, 40]] = 9.0             # ties: the first index wins
    logits[2, [5, 30]] = np.nan               # NaN: the first NaN wins (argmax semantics)
    logits[3] = -np.inf                       # all -inf: index 0
    logits[4, -1] = np.inf
    got = np.asarray(decoding.greedy_tokens(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), -1)))
    np.testing.assert_array_equal(got[:5], [np.argmax(logits[0]), 3, 5, 0, 49])


@pytest.mark.parametrize("stop_early", [False, True])
def test_returned_hidden_states_equal_a_full_forward_pass(tiny, stop_early):
    """The decode pass's hidden states (prompt at prefill, each new token when fed back, the last
    one by an extra step) equal one teacher-forced forward pass over prompt + answer."""
    _, model, params = tiny
    ids, mask = decoding.left_pad(PROMPTS)
    max_new = 6
    stops = ()
    if stop_early:  # row 0 stops on its 3rd token while the others run on
        free = decoding.generate(model, params, ids, mask, max_new_tokens=max_new,
                                 stop_token_ids=())
        stops = (int(np.asarray(free.tokens)[0, 2]),)
    out = decoding.generate(model, params, ids, mask, max_new_tokens=max_new, stop_token_ids=stops,
                            small_batch_kernel=False, return_hidden=True)
    lengths = np.asarray(out.lengths)
    assert lengths.min() < max_new if stop_early else (lengths == max_new).all()
    answer_mask = (np.arange(max_new)[None] < lengths[:, None]).astype(np.int32)
    full_mask = np.concatenate([mask, answer_mask], axis=1)
    _, want = model.apply({"params": params}, np.concatenate([ids, out.tokens], axis=1),
                          attention_mask=full_mask, return_hidden=True)
    real = full_mask.astype(bool)
    assert out.hidden.shape == want.shape
    np.testing.assert_allclose(np.asarray(out.hidden)[real], np.asarray(want)[real], atol=1e-5)
    assert np.abs(np.asarray(want)[real]).max() > 0.1
