"""kernels.decode_attention: the FFI kernel against layers.attention.grouped_attention, its
calibration against XLA, and its injection into Attention.attend_cache (decoding only)."""
import json

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniecg_jax.kernels import decode_attention, native
from uniecg_jax.layers.attention import attention_weights_mask, grouped_attention
from uniecg_jax.models.llm import Decoder, LLMConfig, init_cache


@pytest.fixture(scope="module")
def kernel():
    if native.compiler() is None:
        pytest.skip("no C++ compiler on PATH: the kernel is not built and XLA's attention is used")
    assert decode_attention.load(), "a C++ compiler is present but the kernel failed to build"


@pytest.mark.parametrize("rows,heads,groups,slots,head_dim,offset", [
    (3, 2, 4, 40, 64, 17),      # grouped queries, slots beyond the query's left unread
    (8, 8, 1, 160, 64, 159),    # the small preset's decode shape, every slot written
    (2, 4, 7, 33, 128, 0),      # Qwen2.5-7B's 7 query heads per kv head; the first slot only
])
def test_matches_grouped_attention(kernel, rows, heads, groups, slots, head_dim, offset):
    rng = np.random.default_rng(0)
    query = jnp.asarray(rng.standard_normal((rows, heads, groups, 1, head_dim)), jnp.float32)
    key, value = (jnp.asarray(rng.standard_normal((rows, heads, slots, head_dim)), jnp.float32)
                  for _ in range(2))
    key_mask = np.ones((rows, slots), np.int32)
    key_mask[0, :min(5, offset)] = 0               # left padding, and a row with more of it
    key_mask[-1, :offset // 2] = 0
    want = grouped_attention(query, key, value, attention_weights_mask(offset, 1, key_mask),
                             jnp.float32)
    # The kernel never reads the slots after the query's: garbage there changes nothing (XLA's
    # masked contraction would turn a NaN there into NaNs).
    key = key.at[:, :, offset + 1:].set(1e4)
    value = value.at[:, :, offset + 1:].set(jnp.nan)
    got = jax.jit(decode_attention.attend)(query, key, value, key_mask, jnp.int32(offset + 1))
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)


def test_rejects_shapes_it_cannot_take(kernel):
    key = jnp.ones((1, 2, 8, 40))
    with pytest.raises(ValueError, match="Dh % 16"):
        decode_attention.attend(jnp.ones((1, 2, 1, 1, 40)), key, key, jnp.ones((1, 8)), 3)
    with pytest.raises(ValueError, match="expected query"):
        decode_attention.attend(jnp.ones((1, 2, 1, 2, 64)), jnp.ones((1, 2, 8, 64)),
                                jnp.ones((1, 2, 8, 64)), jnp.ones((1, 8)), 3)


def tiny_decoder():
    model = Decoder(LLMConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16))
    ids = jnp.ones((3, 1), jnp.int32)
    return model, nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids)["params"])


def test_injected_only_into_one_token_cached_steps(kernel):
    """The kernel replaces the cached single-token attention and nothing else: not the prefill
    (several tokens into the cache), not a cache-free forward (training, scoring)."""
    model, params = tiny_decoder()
    cache = init_cache(model.config, 3, 8)

    def call(ids):
        with decode_attention.injected(True):
            return model.apply({"params": params}, ids, attention_mask=jnp.ones_like(ids),
                               cache=cache)
    one = jax.jit(call).lower(jnp.ones((3, 1), jnp.int32)).as_text()
    assert one.count(decode_attention.TARGET) == 2                       # one per layer
    assert decode_attention.TARGET not in jax.jit(call).lower(jnp.ones((3, 4), jnp.int32)).as_text()

    def forward(ids):
        with decode_attention.injected(True):
            return model.apply({"params": params}, ids)
    assert decode_attention.TARGET not in jax.jit(forward).lower(jnp.ones((3, 1), jnp.int32)).as_text()


# --- Calibration: kernel or XLA's attention, by measurement ---------------------------------------
@pytest.fixture
def calibration(kernel, monkeypatch, tmp_path):
    """A fresh decision cache, no forcing variable, a count of measurements, and `slow(side)`."""
    monkeypatch.setenv("UNIECG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("UNIECG_DECODE_ATTENTION_KERNEL", raising=False)
    monkeypatch.setattr(native, "_decisions", {})
    delays = {"kernel": 0.0, "xla": 0.0}
    monkeypatch.setattr(decode_attention, "CALIBRATION_DELAY_S", delays)
    monkeypatch.setattr(decode_attention, "CALIBRATION_SLOTS", 32)    # a quick measurement
    measure, state = decode_attention._measure, {"measured": 0}

    def counted(*args):
        state["measured"] += 1
        return measure(*args, layers=2)
    monkeypatch.setattr(decode_attention, "_measure", counted)

    class Calibration:
        cache = tmp_path

        @property
        def measured(self):
            return state["measured"]

        def slow(self, side):
            delays.update({"kernel": 0.0, "xla": 0.0, side: 0.05})
    return Calibration()


@pytest.mark.parametrize("slow_side,use_kernel", [("kernel", False), ("xla", True)])
def test_calibration_picks_the_faster_side_and_caches_it(calibration, slow_side, use_kernel):
    calibration.slow(slow_side)
    assert decode_attention.calibrate(4, 2, 2, 16) is use_kernel
    [cached] = calibration.cache.glob("decode_attention-choice-*.json")
    record = json.loads(cached.read_text())
    assert record["use_kernel"] is use_kernel and record["groups"] == 2
    calibration.slow("xla" if slow_side == "kernel" else "kernel")
    native._decisions.clear()                       # a new process: read from disk, not measured
    assert decode_attention.usable(jnp.float32, 4, 2, 2, 16) is use_kernel
    assert calibration.measured == 1
    assert decode_attention.calibrate(8, 2, 2, 16) is not use_kernel     # another shape: measured
    assert calibration.measured == 2


def test_forcing_variable_and_ineligible_cases(kernel, monkeypatch):
    monkeypatch.setenv("UNIECG_DECODE_ATTENTION_KERNEL", "1")
    assert decode_attention.usable(jnp.float32, 4, 2, 2, 16)      # forced: nothing measured
    assert not decode_attention.usable(jnp.bfloat16, 4, 2, 2, 16)
    assert not decode_attention.usable(jnp.float32, 4, 2, 2, 24)  # head size not a multiple of 16
    sharded = jax.device_put(jnp.ones(8), jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",)), jax.sharding.PartitionSpec("x")))
    assert not decode_attention.usable(jnp.float32, 4, 2, 2, 16, [sharded])
    monkeypatch.setenv("UNIECG_DECODE_ATTENTION_KERNEL", "0")
    decode_attention.load.cache_clear()
    try:
        assert not decode_attention.load()
        assert not decode_attention.usable(jnp.float32, 4, 2, 2, 16)
    finally:
        monkeypatch.delenv("UNIECG_DECODE_ATTENTION_KERNEL")
        decode_attention.load.cache_clear()
