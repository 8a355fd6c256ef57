"""The `vision` objective: the image tower pretrained on printed pages, then frozen in stage 1.

The tiny demo tower trained from scratch under the LLM loss collapsed to one answer for every page
(issue 16); GEM's tower is a pretrained CLIP that stage 1 keeps frozen. These tests check that the
pretraining targets are the interpretation metrics' own, that the tower learns the heart rate from
the page, and that stage 1 loads the exported tower by `init.clip_dir` and leaves it unchanged.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

from uniecg_jax.config import load_config
from uniecg_jax.convert import hf_clip
from uniecg_jax.data.multimodal import ecg_pixels
from uniecg_jax.data.synthetic import generate_one, stretched_to_rate
from uniecg_jax.eval.interpret_eval import reference_for
from uniecg_jax.train import build_task
from uniecg_jax.train.loop import run, train
from uniecg_jax.train.vision import (HEART_RATE_MEAN, HEART_RATE_SCALE, TowerWithHead, page_loss,
                                     page_targets, statement_names, tower_config)


def _synthetic(rates):
    base = generate_one(75.0, seed=3, record_id="synthetic_base")
    return [stretched_to_rate(base, rate, f"synthetic_{int(rate)}") for rate in rates]


def test_page_targets_are_what_the_interpretation_is_scored_on():
    statements = statement_names()
    record = _synthetic([120.0])[0]
    targets = page_targets(record, statements)
    reference = reference_for(record)
    assert targets["heart_rate_known"] == 1.0
    assert np.isclose(targets["heart_rate"] * HEART_RATE_SCALE + HEART_RATE_MEAN,
                      reference.measurements["heart_rate"])
    named = {statements[i] for i in np.flatnonzero(targets["statements"])}
    assert "sinus tachycardia" in named and targets["statements_known"] == 1.0
    unlabelled = page_targets(record.__class__(**{**record.__dict__, "labels": ()}), statements)
    assert unlabelled["statements_known"] == 0.0 and not unlabelled["statements"].any()


def test_tower_learns_the_heart_rate_from_the_page_and_an_unweighted_output_stays_at_init():
    config = load_config("configs/vision.py:tiny")
    tower = tower_config(config)
    rates = np.array([45.0, 60.0, 75.0, 90.0, 105.0, 120.0, 135.0, 150.0])
    records = _synthetic(rates)
    statements = statement_names()
    images = np.stack([ecg_pixels(r.to_encoder_input(), tower.image_size,
                                  tower.image_aspect_ratio) for r in records])
    targets = [page_targets(r, statements) for r in records]
    batch = {key: jnp.asarray(np.stack([t[key] for t in targets])) for key in targets[0]}
    batch["image"] = jnp.asarray(images)
    model = TowerWithHead(tower, len(statements))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch["image"])["params"])
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: page_loss(model, p, batch, statement_weight=0.0)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    trained, opt_state = params, tx.init(params)
    for _ in range(300):
        trained, opt_state = step(trained, opt_state)
    _, predicted = model.apply({"params": trained}, batch["image"])
    predicted = np.asarray(predicted) * HEART_RATE_SCALE + HEART_RATE_MEAN
    assert np.corrcoef(predicted, rates)[0, 1] > 0.95, predicted
    assert np.abs(predicted - rates).mean() < 10.0, predicted
    # statement_weight 0: the statement outputs' head columns get no gradient.
    kernel0, kernel1 = params["head"]["kernel"], trained["head"]["kernel"]
    np.testing.assert_array_equal(kernel0[..., :-1], kernel1[..., :-1])
    assert not np.allclose(kernel0[..., -1], kernel1[..., -1])


def test_stage1_starts_from_the_pretrained_tower_and_keeps_it_frozen(tmp_path):
    data = ["data.num_synthetic=2", "train.batch_size=8", "train.checkpoint_every=0"]
    vision = load_config("configs/vision.py:tiny", data + ["train.steps=2", "train.log_every=1"])
    done = run(vision, str(tmp_path / "tower"), build_task(vision))
    tower_dir = done.model_dir
    assert tower_dir == str(tmp_path / "tower" / "clip_vision")
    stage1 = load_config("configs/stage1.py:tiny_image", data + [
        "train.steps=2", "train.log_every=1", "data.max_length=40", "model.llm.num_layers=1",
        "model.ecg_encoder.layers=1", f"init.clip_dir={tower_dir}",
        "model.vision_tower.frozen=True", "train.freeze=^vision_tower/"])
    result = train(stage1, str(tmp_path / "stage1"), build_task(stage1))
    ours = jax.tree.map(np.asarray, result.state.params["vision_tower"])
    exported = hf_clip.load_clip_vision(tower_dir, tower_config(vision))
    jax.tree.map(np.testing.assert_array_equal, ours, jax.tree.map(np.asarray, exported))
    # ... and the pretraining moved the tower away from its random init.
    head = TowerWithHead(tower_config(vision), len(statement_names()))
    size = vision.model.vision_tower.image_size
    init = nn.meta.unbox(head.init(jax.random.PRNGKey(int(vision.seed)),
                                   jnp.zeros((1, size, size, 3)))["params"]["vision_tower"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), init, ours))
    assert any(moved)


def test_pretraining_resumes_where_it_stopped(tmp_path):
    """A stopped run continues from its checkpoint, data position included (the page batches
    forward grain's `start_prefetch`, which its checkpoint handler calls on restore): 2 + 1 steps
    equal 3 steps."""
    base = ["data.num_synthetic=2", "train.batch_size=8", "train.log_every=1",
            "train.checkpoint_every=1", "train.warmup_steps=0",
            "train.min_lr_ratio=1.0"]   # a constant rate: the schedule does not depend on steps

    def params_after(workdir, steps):
        config = load_config("configs/vision.py:tiny", base + [f"train.steps={steps}"])
        return train(config, str(workdir), build_task(config)).state.params

    straight = params_after(tmp_path / "straight", 3)
    params_after(tmp_path / "stopped", 2)
    resumed = params_after(tmp_path / "stopped", 3)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, straight),
                 jax.tree.map(np.asarray, resumed))
