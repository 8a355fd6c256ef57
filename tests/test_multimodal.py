"""The multimodal stage-1 sequence (GEM's ECG-then-image splice) and modality dropout.

Reference for the order and the projectors: lanxiang1017/GEM `llava/model/llava_arch.py` at c8a580f
(`encode_ecgs`: ecg_tower -> ecg_projector -> mm_projector; `encode_images`: vision tower ->
mm_projector; `prepare_inputs_labels_for_multimodal`: `torch.cat([ecg_features, image_features],
dim=1)` spliced at the placeholder).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_stage1 import check_one_step_on_8_devices_equals_one_device

from uniecg_jax.config import load_config
from uniecg_jax.data.ecg_image import PrintDistortions
from uniecg_jax.data.multimodal import ecg_pixels, example_seed
from uniecg_jax.data.record import to_canonical_lead_order
from uniecg_jax.data.record import to_encoder_lead_order
from uniecg_jax.models.llm import Decoder
from uniecg_jax.models.stage1 import UniECG, build_unified, expand_multimodal_inputs, \
    next_real_targets
from uniecg_jax.train import build_task
from uniecg_jax.train.stage1 import drop_modalities, stage1_loss

TINY = ["data.max_length=40", "data.image_distortions=True", "data.num_synthetic=0", "train.warmup_steps=0",
        "train.log_every=1", "train.checkpoint_every=0", "train.batch_size=8",
        "model.llm.num_layers=1", "model.ecg_encoder.layers=1", "model.vision_tower.num_layers=2"]
PLACEHOLDER = 4  # the <ecg> id of the tiny tokenizer


def _config(extra=()):
    return load_config("configs/stage1.py:tiny_image", TINY + list(extra))


def _inputs(ucfg, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 500, size=(batch, length)).astype(np.int32)
    positions = rng.integers(1, length - 1, size=batch).astype(np.int32)
    ids[np.arange(batch), positions] = PLACEHOLDER
    ecg = rng.normal(size=(batch, ucfg.encoder.num_leads, ucfg.encoder.num_samples))
    image = rng.normal(size=(batch, *ucfg.image_shape))
    return ids, positions, ecg.astype(np.float32), image.astype(np.float32)


def _init(model, ids, ecg, positions):
    return nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids, ecg, positions)["params"])


def test_ecg_then_image_splice_equals_manual_concatenation_for_every_input_kind():
    model, ucfg = build_unified(_config().model)
    num_ecg, num_image = ucfg.num_ecg_tokens, ucfg.num_image_tokens
    assert (num_ecg, num_image) == (101, 16)
    length = 10
    ids, positions, ecg, image = _inputs(ucfg, 3, length)
    params = _init(model, ids, ecg, positions)
    assert set(params) == {"ecg_tower", "llm", "vision_tower"}
    ecg_present = np.array([1, 1, 0], np.int32)     # both, signal only, image only
    image_present = np.array([1, 0, 1], np.int32)
    logits = model.apply({"params": params}, ids, ecg, positions, image=image,
                         ecg_present=ecg_present, image_present=image_present)
    _, mask, _ = expand_multimodal_inputs(ids, jnp.ones_like(ids), positions, ecg_present,
                                          image_present, num_ecg, num_image, 0)
    mask = np.asarray(mask)
    assert logits.shape[1] == length - 1 + num_ecg + num_image
    expected_counts = [length - 1 + num_ecg + num_image, length - 1 + num_ecg,
                       length - 1 + num_image]
    assert mask.sum(axis=1).tolist() == expected_counts

    ecg_tokens = np.asarray(model.apply({"params": params}, ecg, method=UniECG.encode_ecg))
    # Image tokens by hand: CLIP features -> mm_projector alone (Linear, exact GELU, Linear).
    features = model.apply({"params": params}, image, method=lambda m, x: m.vision_tower(x))
    mm = params["ecg_tower"]["projector"]["mm_projector"]
    hidden = jax.nn.gelu(features @ mm["fc_0"]["kernel"] + mm["fc_0"]["bias"], approximate=False)
    image_tokens = np.asarray(hidden @ mm["fc_1"]["kernel"] + mm["fc_1"]["bias"])
    table = np.asarray(params["llm"]["embedding"])
    decoder = Decoder(ucfg.llm)
    for row in range(3):
        place = positions[row]
        present = ([ecg_tokens[row]] if ecg_present[row] else []) + (
            [image_tokens[row]] if image_present[row] else [])
        manual = np.concatenate([table[ids[row, :place]], *present, table[ids[row, place + 1:]]])
        assert manual.shape[0] == expected_counts[row]
        manual_positions = jnp.arange(manual.shape[0], dtype=jnp.int32)[None]
        manual_logits = decoder.apply({"params": params["llm"]},
                                      jnp.zeros((1, manual.shape[0]), jnp.int32),
                                      extra_embeddings=jnp.asarray(manual)[None],
                                      extra_positions=manual_positions)[0]
        # The real positions of the fixed-size sequence, in order, are the manual sequence.
        np.testing.assert_allclose(np.asarray(logits[row])[mask[row] > 0], manual_logits,
                                   atol=2e-5, rtol=2e-5, err_msg=f"row {row}")


def test_next_real_targets_skip_masked_slots():
    ids = jnp.array([[10, 11, 12, 13, 14, 15]])
    mask = jnp.array([[1, 1, 0, 0, 1, 1]])
    loss_mask = jnp.array([[0, 0, 0, 0, 1, 1]])
    targets, target_mask = next_real_targets(ids, mask, loss_mask)
    # 11 predicts 14 across the absent slots; absent slots and the last token predict nothing.
    assert targets[0, :2].tolist() == [11, 14] and targets[0, 4] == 15
    assert target_mask[0].tolist() == [0, 1, 0, 0, 1, 0]


def _image_batch(task, ucfg, seed=0):
    """A batch of the tiny_image loader (every ECG's printed page rendered) with mixed inputs."""
    batch = next(task.make_data(0, 1, 8))
    keys = batch.pop("record_key")
    assert batch["image"].shape == (8, *ucfg.image_shape)
    assert batch["ecg_present"].tolist() == batch["image_present"].tolist() == [1] * 8
    # The page of the example's own signal (canonical leads), with its record-seeded distortions.
    np.testing.assert_array_equal(batch["image"][3], ecg_pixels(
        batch["ecg"][3], ucfg.vision.image_size, ucfg.vision.image_aspect_ratio,
        distortions=PrintDistortions(), seed=example_seed(keys[3], 3, 0)))
    batch["ecg_present"] = np.array([1, 1, 1, 1, 1, 0, 1, 0], np.int32)
    batch["image_present"] = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.int32)
    return batch


@pytest.fixture(scope="module")
def image_task_and_batch():
    config = _config()
    task = build_task(config)
    _, ucfg = build_unified(task.config.model)
    return config, task, _image_batch(task, ucfg)


def test_multimodal_step_on_8_devices_equals_one_device(image_task_and_batch):
    state = check_one_step_on_8_devices_equals_one_device(*image_task_and_batch)
    assert set(state.params) == {"ecg_tower", "llm", "vision_tower"}


def test_drop_modalities_never_drops_both_and_never_touches_single_inputs():
    ecg_present = jnp.array([1, 1, 0] * 400)
    image_present = jnp.array([1, 0, 1] * 400)
    ecg, image = drop_modalities(ecg_present, image_present, jax.random.PRNGKey(0), 0.5, 0.5)
    assert int((ecg + image).min()) == 1
    np.testing.assert_array_equal(ecg[1::3], 1)
    np.testing.assert_array_equal(image[2::3], 1)
    both = np.asarray(ecg[0::3] + image[0::3])
    # p = 0.5 each: both kept 1/4; ECG alone 1/4 + 1/8 (the coin), image alone the same.
    assert abs((both == 2).mean() - 0.25) < 0.06
    assert abs(np.asarray(ecg[0::3] == 0).mean() - 0.375) < 0.06
    unchanged = drop_modalities(ecg_present, image_present, jax.random.PRNGKey(0), 0.0, 0.0)
    np.testing.assert_array_equal(unchanged[0], ecg_present)
    np.testing.assert_array_equal(unchanged[1], image_present)


def _loss_and_grads(model, params, batch, ecg_dropout, image_dropout, rng):
    return jax.value_and_grad(lambda p: stage1_loss(model, p, batch, rng, False, ecg_dropout,
                                                    image_dropout)[0])(params)


def _max_abs(tree):
    return max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(tree))


def test_modality_dropout_probability_zero_and_one(image_task_and_batch):
    _, task, batch = image_task_and_batch
    # tiny_image's tower trains (`test_tiny_image_towers_train`), so only the dropout can keep its
    # gradient at zero.
    model, ucfg = build_unified(task.config.model)
    params = jax.jit(lambda rng: nn.meta.unbox(task.init_params(rng)))(jax.random.PRNGKey(0))
    batch = jax.tree.map(jnp.asarray, batch)
    rng = jax.random.PRNGKey(3)

    plain, plain_grads = _loss_and_grads(model, params, batch, 0.0, 0.0, None)
    loss, grads = _loss_and_grads(model, params, batch, 0.0, 0.0, rng)
    np.testing.assert_allclose(loss, plain, rtol=1e-6)
    assert _max_abs(plain_grads["vision_tower"]) > 0
    assert _max_abs(plain_grads["ecg_tower"]["projector"]["ecg_projector"]) > 0

    # ECG dropped from every two-input example: exactly the loss with those ECGs absent.
    no_ecg = dict(batch, ecg_present=jnp.where(batch["image_present"] > 0, 0,
                                               batch["ecg_present"]))
    dropped, _ = _loss_and_grads(model, params, batch, 1.0, 0.0, rng)
    np.testing.assert_allclose(dropped, _loss_and_grads(model, params, no_ecg, 0.0, 0.0, None)[0],
                               rtol=1e-6)
    assert abs(float(dropped) - float(plain)) > 1e-4

    # With no example left carrying an ECG, nothing reaches the LLM from the ECG path; with no
    # example carrying an image, nothing from the image tower. The shared mm_projector still learns.
    only_images = dict(batch, ecg_present=jnp.zeros_like(batch["ecg_present"]),
                       image_present=jnp.ones_like(batch["image_present"]))
    _, grads = _loss_and_grads(model, params, only_images, 1.0, 0.0, rng)
    assert _max_abs(grads["ecg_tower"]["encoder"]) == 0
    assert _max_abs(grads["ecg_tower"]["projector"]["ecg_projector"]) == 0
    assert _max_abs(grads["ecg_tower"]["projector"]["mm_projector"]) > 0
    assert _max_abs(grads["vision_tower"]) > 0
    all_both = dict(batch, ecg_present=jnp.ones_like(batch["ecg_present"]),
                    image_present=jnp.ones_like(batch["image_present"]))
    _, grads = _loss_and_grads(model, params, all_both, 0.0, 1.0, rng)
    assert _max_abs(grads["vision_tower"]) == 0
    assert _max_abs(grads["ecg_tower"]["projector"]["ecg_projector"]) > 0
    _, grads = _loss_and_grads(model, params, all_both, 1.0, 0.0, rng)
    assert _max_abs(grads["ecg_tower"]["encoder"]) == 0
    assert _max_abs(grads["ecg_tower"]["projector"]["ecg_projector"]) == 0
    assert _max_abs(grads["vision_tower"]) > 0


def test_signal_only_model_keeps_its_layout_and_rejects_images():
    model, ucfg = build_unified(load_config("configs/stage1.py:tiny", TINY[:-1]).model)
    assert ucfg.vision is None and ucfg.num_slots == ucfg.num_ecg_tokens
    ids, positions, ecg, _ = _inputs(build_unified(_config().model)[1], 1, 8)
    params = _init(model, ids, ecg, positions)
    assert set(params) == {"ecg_tower", "llm"}
    with pytest.raises(ValueError, match="no image tower"):
        model.apply({"params": params}, ids, ecg, positions,
                    image=np.zeros((1, 56, 56, 3), np.float32))


def test_rendering_reads_the_encoder_lead_order_back_to_the_page_order():
    ecg = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for order in ("canonical", "mimic_iv"):
        np.testing.assert_array_equal(
            to_canonical_lead_order(to_encoder_lead_order(ecg, order), order), ecg)
    mimic = to_encoder_lead_order(ecg, "mimic_iv")
    assert not np.array_equal(to_canonical_lead_order(mimic, "canonical"), ecg)


class _ListIterator:
    """A grain-like iterator over fixed batches with get_state / set_state (the position)."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return self.batches[self.position - 1]

    def get_state(self):
        return str(self.position).encode()

    def set_state(self, state):
        self.position = int(state.decode())


def test_rendered_images_memoise_pages_and_keep_the_iterator_state(monkeypatch):
    """A page is rendered once per (signal, seed) over the epochs, and a checkpoint's data
    position (`get_state`) is the wrapped loader's, so a resumed run sees the same batches."""
    from uniecg_jax.data import multimodal
    calls = []

    def fake_pixels(ecg, image_size, aspect, lead_order, distortions, seed):
        calls.append(seed)
        return np.full((image_size, image_size, 3), ecg[0, 0] + seed % 7, np.float32)

    monkeypatch.setattr(multimodal, "ecg_pixels", fake_pixels)
    ecgs = np.arange(2 * 12 * 4, dtype=np.float32).reshape(2, 12, 4)
    epoch = [dict(ecg=ecgs, record_key=np.array([11, 12])),
             dict(ecg=ecgs[::-1], record_key=np.array([12, 11]))]
    images = multimodal.with_rendered_images(_ListIterator(epoch * 2), 4, "pad", seed=3)
    first = [next(images) for _ in range(2)]
    assert len(calls) == 2                                  # two examples, two pages
    np.testing.assert_array_equal(first[1]["image"], first[0]["image"][::-1])
    state = images.get_state()
    again = [next(images) for _ in range(2)]
    assert len(calls) == 2                                  # the second epoch renders nothing
    np.testing.assert_array_equal(again[0]["image"], first[0]["image"])
    images.set_state(state)
    assert np.array_equal(next(images)["image"], again[0]["image"]) and images.get_state() != state
    assert first[0]["ecg_present"].tolist() == first[0]["image_present"].tolist() == [1, 1]


@pytest.mark.parametrize("variant", ["tiny_image", "demo_image"])
def test_tiny_image_towers_train(variant):
    """No pretrained tiny ViT exists: the tiny towers train from scratch (a frozen random tower
    gave demo_image one answer for every page); GEM's pretrained CLIP tower stays frozen."""
    config = load_config(f"configs/stage1.py:{variant}")
    assert config.model.vision_tower.frozen is False
    assert "vision_tower" not in config.train.freeze
    gem = load_config("configs/stage1.py:vicuna_7b")
    assert gem.model.vision_tower.frozen is True and "^vision_tower/" in gem.train.freeze
