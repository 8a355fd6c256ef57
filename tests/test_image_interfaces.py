"""Issue 16 item 4: the image modality at the interfaces. `Interpreter` on signal / image / both
examples in one batch, the page rendered from a signal, image files, `uniecg interpret --image`,
and `uniecg eval interpret` per input kind (sharded, resumable)."""
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from uniecg_jax.cli import main
from uniecg_jax.config import config_to_json, load_config
from uniecg_jax.data import bundled_record_paths, load_bundled_records
from uniecg_jax.data.ecg_image import render_ecg_image
from uniecg_jax.data.image_preprocess import clip_preprocess
from uniecg_jax.data.multimodal import render_dpi
from uniecg_jax.data.record import ENCODER_FS
from uniecg_jax.data.tokenizer import load_tokenizer
from uniecg_jax.errors import RecordError, UniECGError
from uniecg_jax.eval import interpret_eval
from uniecg_jax.inference.interpret import (DEFAULT_PROMPT, Interpreter, encode_multimodal_fn,
                                            export_model)
from uniecg_jax.models.stage1 import build_unified

TINY = ["data.max_length=40", "model.llm.num_layers=1", "model.ecg_encoder.layers=1",
        "model.vision_tower.num_layers=2", "eval.max_new_tokens=5"]
NEW_TOKENS = 5
IMAGE_SIZE = 56     # tiny_image's tower


def _page(ecg):
    """The printed page of `ecg` as the training loader renders it (`render_dpi`)."""
    return render_ecg_image(ecg, ENCODER_FS, dpi=render_dpi(IMAGE_SIZE))


def _model(spec="configs/stage1.py:tiny_image", extra=()):
    config = load_config(spec, TINY[:3] + list(extra))
    model, ucfg = build_unified(config.model)
    enc = ucfg.encoder
    params = jax.jit(lambda rng: nn.meta.unbox(model.init(
        rng, np.zeros((1, 8), np.int32), np.zeros((1, enc.num_leads, enc.num_samples), np.float32),
        np.zeros((1,), np.int32))["params"]))(jax.random.PRNGKey(0))
    tokenizer = load_tokenizer(None, placeholder=ucfg.input.placeholder)
    return Interpreter(model, params, tokenizer, config)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(workdir of an untrained tiny_image model, its Interpreter)."""
    interpreter = _model(extra=TINY[3:])
    workdir = str(tmp_path_factory.mktemp("stage1_image"))
    export_model(workdir, interpreter.params, interpreter.config, interpreter.tokenizer)
    return workdir, Interpreter.load(workdir)


@pytest.fixture(scope="module")
def ecgs():
    return np.stack([r.to_encoder_input() for r in load_bundled_records()[:3]])


def test_token_counts_per_input_kind(exported, ecgs):
    _, interpreter = exported
    cfg = interpreter.model.config
    batch = interpreter.model_inputs([ecgs[0], None, ecgs[2]],
                                     [None, _page(ecgs[1]), None],
                                     render_missing_images=False)
    assert batch.kinds == ["signal", "image", "signal"]
    rendered = interpreter.model_inputs(ecgs[2:3])
    assert rendered.kinds == ["both"]
    text = len(interpreter.inputs.prompt_ids(DEFAULT_PROMPT, with_ecg=True)) - 1
    for present, want in (((1, 0), cfg.num_ecg_tokens), ((0, 1), cfg.num_image_tokens),
                          ((1, 1), cfg.num_ecg_tokens + cfg.num_image_tokens)):
        ids, mask, slots = interpreter.build_inputs([DEFAULT_PROMPT], np.array([present[0]]),
                                                    np.array([present[1]]))
        assert slots.shape == (1, cfg.num_slots)
        assert int(mask.sum()) == text + want
        # The absent block's slots are exactly the ones masked out.
        assert mask[0, slots[0, :cfg.num_ecg_tokens]].tolist() == [present[0]] * cfg.num_ecg_tokens
        assert mask[0, slots[0, cfg.num_ecg_tokens:]].tolist() == (
            [present[1]] * cfg.num_image_tokens)


def test_image_only_is_the_explicit_page_and_equals_full_forward_decoding(exported, ecgs):
    """An image-only example from an RGB page, from a PNG of it and from its CLIP pixels gives one
    answer, and that answer is greedy decoding by full forward passes of the training model with
    the ECG absent."""
    workdir, interpreter = exported
    page = _page(ecgs[1])
    vision = interpreter.model.config.vision
    pixels = clip_preprocess(page, vision.image_size, vision.image_aspect_ratio)
    np.testing.assert_array_equal(interpreter.image_pixels(page), pixels)
    from_page = interpreter.interpret(None, images=[page], max_new_tokens=NEW_TOKENS)
    assert interpreter.interpret(None, images=pixels[None], max_new_tokens=NEW_TOKENS) == from_page
    png = os.path.join(workdir, "page.png")
    Image.fromarray(page).save(png)
    assert interpreter.interpret(None, images=[png], max_new_tokens=NEW_TOKENS) == from_page

    prompt = interpreter.inputs.prompt_ids(DEFAULT_PROMPT, with_ecg=True)
    ids, eos = list(prompt), interpreter.model.config.llm.eos_token_id
    position = np.asarray([prompt.index(interpreter.inputs.placeholder_id)], np.int32)
    forward = jax.jit(lambda params, ids: interpreter.model.apply(
        {"params": params}, ids, None, position, image=pixels[None]))
    for _ in range(NEW_TOKENS):
        ids.append(int(np.argmax(forward(interpreter.params, np.asarray([ids], np.int32))[0, -1])))
        if ids[-1] == eos:
            break
    want = interpreter.tokenizer.decode([t for t in ids[len(prompt):] if t != eos],
                                        skip_special_tokens=True).strip()
    assert want and from_page == [want]


def test_rendering_from_signal_equals_passing_the_page_in_one_compiled_program(exported, ecgs):
    _, interpreter = exported
    pages = [_page(ecg) for ecg in ecgs]
    rendered = interpreter.interpret(ecgs, max_new_tokens=NEW_TOKENS)
    assert interpreter.interpret(ecgs, images=pages, max_new_tokens=NEW_TOKENS) == rendered
    np.testing.assert_array_equal(interpreter.model_inputs(ecgs).image,
                                  interpreter.model_inputs(ecgs, pages).image)
    # A batch mixing the three kinds runs the program compiled for the batch above and answers
    # each example as it is answered alone.
    compiled = encode_multimodal_fn(interpreter.model)._cache_size()
    mixed_ecgs, mixed_images = [ecgs[0], None, ecgs[2]], [None, pages[1], pages[2]]
    mixed = interpreter.interpret(mixed_ecgs, images=mixed_images, render_missing_images=False,
                                  max_new_tokens=NEW_TOKENS)
    assert encode_multimodal_fn(interpreter.model)._cache_size() == compiled
    alone = [interpreter.interpret([e], images=[i], render_missing_images=False,
                                   max_new_tokens=NEW_TOKENS)[0]
             for e, i in zip(mixed_ecgs, mixed_images)]
    assert mixed == alone and mixed[2] == rendered[2]


def test_model_without_image_tower_and_bad_images_fail_clearly(exported, ecgs, tmp_path, capsys):
    signal_model = _model("configs/stage1.py:tiny")
    with pytest.raises(UniECGError, match="no image tower"):
        signal_model.interpret(None, images=[_page(ecgs[0])])
    assert len(signal_model.interpret(ecgs[:1], max_new_tokens=2)) == 1   # signals still work
    # The CLI refuses before loading weights (this checkpoint holds only its config).
    ckpt = tmp_path / "signal_only" / "model"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(config_to_json(load_config("configs/stage1.py:tiny")))
    png = str(tmp_path / "page.png")
    Image.fromarray(_page(ecgs[0])).save(png)
    assert main(["interpret", "--ckpt", str(tmp_path / "signal_only"), "--image", png]) == 1
    assert "no image tower" in capsys.readouterr().err
    stage2 = tmp_path / "stage2" / "model"
    stage2.mkdir(parents=True)
    (stage2 / "config.json").write_text(config_to_json(load_config("configs/stage2.py:tiny")))
    assert main(["chat", "--ckpt", str(tmp_path / "stage2"), "--image", png, "--prompt", "Hi"]) == 1
    assert "no image tower" in capsys.readouterr().err

    workdir, interpreter = exported
    not_an_image = tmp_path / "scan.png"
    not_an_image.write_text("this is not a PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(open(png, "rb").read()[:2000])
    for bad in (not_an_image, truncated, tmp_path / "missing.jpg"):
        with pytest.raises(RecordError, match=re.escape(str(bad))):
            interpreter.interpret(None, images=[str(bad)])
        assert main(["interpret", "--ckpt", workdir, "--image", str(bad)]) == 1
        err = capsys.readouterr().err
        assert str(bad) in err and "Traceback" not in err
    record = bundled_record_paths()[0]
    assert main(["interpret", "--ckpt", workdir, "--ecg", record, "--image", png, png]) == 1
    assert "one image per record" in capsys.readouterr().err


def test_cli_interpret_image_and_pairing(exported, tmp_path, capsys):
    workdir, interpreter = exported
    records = bundled_record_paths()[:2]
    from uniecg_jax.data import read_record
    signals = [read_record(path).to_encoder_input() for path in records]
    pngs = []
    for index, signal in enumerate(signals):
        pngs.append(str(tmp_path / f"page{index}.png"))
        Image.fromarray(_page(signal)).save(pngs[-1])
    common = ["interpret", "--ckpt", workdir, "--json", "--max-new-tokens", str(NEW_TOKENS)]

    def run(*args):
        assert main(common + list(args)) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    image_only = run("--image", *pngs)
    assert [row["kind"] for row in image_only] == ["image", "image"]
    assert [row["image"] for row in image_only] == pngs
    assert [row["report"] for row in image_only] == interpreter.interpret(
        None, images=pngs, max_new_tokens=NEW_TOKENS)
    both = run("--ecg", *records, "--image", *pngs)
    assert [(row["kind"], row["ecg"], row["image"]) for row in both] == [
        ("both", r, p) for r, p in zip(records, pngs)]
    # --ecg alone renders each page: the same answers as the record paired with its PNG.
    assert [row["report"] for row in run("--ecg", *records)] == [row["report"] for row in both]
    assert [row["kind"] for row in run("--ecg", records[0], "--signal-only")] == ["signal"]


def test_eval_interpret_per_kind_resumes_after_a_kill(exported, tmp_path):
    _, interpreter = exported
    items = interpret_eval.items_from_records(load_bundled_records()[:3])
    kinds = interpret_eval.eval_kinds(interpreter)
    assert kinds == ("signal", "image", "both")
    common = dict(process_index=0, process_count=1, batch_size=4, max_new_tokens=3,
                  progress=False)
    whole = str(tmp_path / "whole.jsonl")
    interpret_eval.run_shard(interpreter, items, whole, **common)
    want = interpret_eval.merge(whole, 1, items)
    assert set(want["by_kind"]) == set(kinds) and want["model"] == want["by_kind"]["both"]
    assert all(m["num_records"] == 3 for m in want["by_kind"].values())
    with open(whole) as f:
        rows = [json.loads(line) for line in f]
    assert [(row["record"], row["kind"]) for row in rows] == [
        (item.record_id, kind) for item in items for kind in kinds]
    # Each row is the Interpreter's answer for that input kind.
    signal = interpreter.interpret([items[0].ecg], render_missing_images=False,
                                   max_new_tokens=3)
    image = interpreter.interpret(None, images=[interpreter.rendered_pixels(items[0].ecg)],
                                  max_new_tokens=3)
    assert [rows[0]["generated"], rows[1]["generated"]] == signal + image

    # Killed mid-write of its fifth row: rerunning completes the job.
    out = str(tmp_path / "killed.jsonl")
    part = interpret_eval.part_path(out, 0, 1)
    with open(interpret_eval.part_path(whole, 0, 1)) as f:
        lines = f.readlines()
    with open(part, "w") as f:
        f.write("".join(lines[:4]) + lines[4][:20])
    with open(part + ".job.json", "w") as f:
        f.write(open(interpret_eval.part_path(whole, 0, 1) + ".job.json").read())
    interpret_eval.run_shard(interpreter, items, out, **common)
    assert interpret_eval.merge(out, 1, items) == want
    with open(out) as f:
        assert [json.loads(line) for line in f] == rows
    # Resuming with other kinds would mix two jobs.
    with pytest.raises(UniECGError, match="other settings"):
        interpret_eval.run_shard(interpreter, items, out, **dict(common), kinds=["image"])
    with pytest.raises(UniECGError, match="choose from"):
        interpret_eval.eval_kinds(interpreter, ["photo"])


def test_pages_render_at_gems_oversampling_for_the_tower_size():
    from uniecg_jax.data.multimodal import ecg_pixels
    assert [render_dpi(size) for size in (336, 224, 56)] == [200.0, 134.0, 50.0]
    ecg = load_bundled_records()[0].to_encoder_input()
    np.testing.assert_array_equal(ecg_pixels(ecg, IMAGE_SIZE, "ori"),
                                  clip_preprocess(_page(ecg), IMAGE_SIZE, "ori"))


def _metrics(micro, macro, mae):
    return {"diagnosis": {"micro": {"f1": micro}, "macro": {"f1": macro}},
            "measurements": {"heart_rate": {"mae": mae}}}


def test_image_demo_summary_has_each_seed_the_spread_and_the_verdict():
    from uniecg_jax.demo.stage1 import image_summary_lines
    baseline = _metrics(0.3, 0.05, 20.0)
    per_seed = {0: {"baseline": baseline, "by_kind": {
                    "signal": _metrics(0.4, 0.10, 10.0), "image": _metrics(0.2, 0.10, 10.0),
                    "both": _metrics(0.5, 0.20, None)}},
                1: {"baseline": _metrics(0.3, 0.05, 25.0), "by_kind": {
                    "signal": _metrics(0.5, 0.12, 12.0), "image": _metrics(0.4, 0.10, 10.0),
                    "both": _metrics(0.5, 0.20, 5.0)}}}
    signal, image, both = image_summary_lines(per_seed)
    assert signal.split(":")[0].strip() == "signal"
    assert "micro F1 0.400 / 0.500 (mean 0.450, spread 0.100) vs baseline 0.300 / 0.300" in signal
    assert "HR MAE 10.000 / 12.000 (mean 11.000, spread 2.000) vs baseline 20.000 / 25.000" \
        in signal
    assert signal.endswith("-> beats the baselines on every seed")
    assert image.endswith("does NOT beat the baselines on every seed")   # seed 0 micro F1
    assert "HR MAE n/a / 5.000 vs" in both and "NOT" in both          # HR never stated (seed 0)


@pytest.mark.slow
def test_quick_image_demo_trains_and_scores_every_kind(tmp_path):
    from uniecg_jax.demo.stage1 import run_image_demo
    lines = run_image_demo(str(tmp_path / "stage1_image"), quick=True)
    assert [line.split(":")[0].strip() for line in lines[1:4]] == ["signal", "image", "both"]
    metrics = json.loads((tmp_path / "stage1_image" / "eval_seed0" /
                          "results.jsonl.metrics.json").read_text())
    assert set(metrics["by_kind"]) == {"signal", "image", "both"}
    assert len({m["num_records"] for m in metrics["by_kind"].values()}) == 1
