"""Diffusion training (VAE then UNet in the shared loop), generation CLI, generation eval, ECG-CLIP,
FID/CLIP closed forms and the DiffuSETS import CLI."""
import json
import os
import signal

import jax
import numpy as np
import optax
import pytest
import wfdb

from uniecg_jax import sharding
from uniecg_jax.cli import main as cli_main
from uniecg_jax.config import load_config
from uniecg_jax.data.bundled import diffusion_records
from uniecg_jax.data.measure import heart_rate_bpm
from uniecg_jax.data.record import DIFFUSION_FS
from uniecg_jax.data.text_encoder import text_encoder_for
from uniecg_jax.diffusion.pipeline import load_pipeline
from uniecg_jax.errors import CheckpointError
from uniecg_jax.eval import clip_training, ecg_fidelity, generate_eval
from uniecg_jax.kernels import native, winograd_conv
from uniecg_jax.models import ecg_clip
from uniecg_jax.train import diffusion as diffusion_train, loop, optim, state as state_lib, \
    step as step_lib

TEXT_DIM = 16
# A hashing text encoder (no model load), bundled records only (no 2 s/record synthetic ECGs).
TINY = [f"text.encoder=hash:{TEXT_DIM}", f"text.embed_dim={TEXT_DIM}", "train.batch_size=8",
        "train.warmup_steps=0", "train.log_every=1", "train.checkpoint_every=0",
        "train.vae_steps=2", "train.unet_steps=4", "train.learning_rate=2e-3",
        # The UNet's weight average is exported, checkpointed and resumed (off in tiny itself).
        "train.ema_decay=0.999",
        # Data parallel over the 8 devices: compiles much faster than fsdp on 2 cores (fsdp and
        # tensor sharding are checked by the one-step comparison).
        "mesh.data=-1", "mesh.fsdp=1"]


def _config(extra=()):
    return load_config("configs/diffusion.py:tiny", TINY + ["data.num_synthetic=0"] + list(extra))


def _run(workdir):
    """`uniecg train`'s path: both phases of the shared loop, then the export."""
    config = _config()
    return loop.run(config, workdir, diffusion_train.build_task(config))


def _batch(config, seed=0):
    """A UNet batch with precomputed latents (the frozen VAE encoder is left out of the compared
    program: compiling it on a 2x2x2 CPU mesh takes minutes)."""
    rng = np.random.default_rng(seed)
    return {"latent": rng.standard_normal((8, 128, 4)).astype(np.float32),
            "text_embedding": rng.standard_normal((8, TEXT_DIM)).astype(np.float32),
            "sex": (np.arange(8) % 2).astype(np.float32),
            "age": rng.uniform(20, 80, 8).astype(np.float32),
            "heart_rate": rng.uniform(50, 120, 8).astype(np.float32)}


def _one_step(mesh, config, task, batch):
    abstract_params, _ = sharding.abstract_sharded_init(task.init_params, mesh,
                                                        jax.random.PRNGKey(0))
    train_cfg = diffusion_train.phase_config(config, "unet").train
    tx, schedule, labels = optim.make_optimizer(train_cfg, abstract_params)
    _, shardings = state_lib.abstract_train_state(task.init_params, tx, mesh)
    params = task.initial_params(mesh, abstract_params)
    state = state_lib.init_train_state(task.init_params, tx, mesh, jax.random.PRNGKey(0),
                                       shardings, params)
    step = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, schedule, labels),
                                   shardings, mesh)
    state, metrics = step(state, sharding.global_batch_from_host(batch, mesh),
                          jax.random.PRNGKey(1))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow  # compiling the sharded UNet step takes 1-2 min on 2 loaded cores
def test_unet_step_on_8_devices_equals_one_device():
    config = _config()
    task = diffusion_train.build_unet_task(config)
    batch = _batch(config)
    single = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    ref_state, ref_metrics = _one_step(single, config, task, batch)
    # fsdp x tensor over all 8 devices (the 2x2x2 data/fsdp/tensor mesh, where XLA once swapped
    # batch shards inside the UNet, is checked in tests/test_sharding.py).
    state, metrics = _one_step(sharding.make_mesh(dict(data=1, fsdp=4, tensor=2)), config, task,
                               batch)
    assert 0.5 < ref_metrics["loss"] < 3.0  # epsilon MSE of an untrained UNet is ~1
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    # Adam's first update is ~lr * sign(grad): a real bug moves a parameter by ~lr (2e-3).
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                 jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # The frozen VAE did not move at all.
    initial = task.initial_params(single, sharding.abstract_sharded_init(
        task.init_params, single, jax.random.PRNGKey(0))[0])
    for got, want in zip(jax.tree.leaves(state.params["vae"]), jax.tree.leaves(initial["vae"])):
        np.testing.assert_array_equal(got, np.asarray(want))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted two-phase run (also the model the CLI tests use)."""
    workdir = str(tmp_path_factory.mktemp("diffusion"))
    result = _run(workdir)
    return workdir, result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A randomly initialised tiny model exported like a trained one (no train-step compiles), for
    the generation and eval tests."""
    from uniecg_jax.layers.params import init_params_on_host

    config = _config()
    vae, unet = diffusion_train.build_models(config)
    params = {"vae": init_params_on_host(vae, 0, *diffusion_train._vae_inputs(config))["params"],
              "unet": init_params_on_host(unet, 1, *diffusion_train._unet_inputs(unet))["params"]}
    workdir = str(tmp_path_factory.mktemp("exported"))
    diffusion_train.export_model(os.path.join(workdir, "model"), params, config)
    return workdir


@pytest.mark.slow  # the two train-step compiles take ~2 min on 2 loaded cores
def test_two_phase_training_exports_and_loads(trained):
    workdir, full = trained
    vae, unet = full.phases["vae"], full.phases["unet"]
    assert full.stopped_by_signal is None and vae.steps_run == 2 and unet.steps_run == 4
    assert full.model_dir == os.path.join(workdir, "model")
    vae_losses = [h["loss"] for h in vae.history]
    assert np.all(np.isfinite(vae_losses)) and len(unet.history) == 4
    assert os.path.isfile(os.path.join(workdir, "unet", "metrics.jsonl"))
    # The UNet phase kept the VAE phase's final weights exactly (frozen by the optimizer).
    for got, want in zip(jax.tree.leaves(jax.device_get(unet.state.params["vae"])),
                         jax.tree.leaves(jax.device_get(vae.state.params))):
        np.testing.assert_array_equal(got, want)

    # The export loads with one call and holds the trained UNet's weight average (TINY sets
    # train.ema_decay), not its last weights; the frozen VAE is exported as it was.
    pipeline, config = load_pipeline(workdir)
    assert config.text.encoder == f"hash:{TEXT_DIM}" and config.train.ema_decay > 0
    exported_unet = jax.tree.leaves(pipeline.unet_params["params"])
    for got, want in zip(exported_unet, jax.tree.leaves(jax.device_get(
            unet.state.opt_state.ema["unet"]))):
        np.testing.assert_array_equal(got, want)
    assert max(np.abs(got - last).max() for got, last in zip(
        exported_unet, jax.tree.leaves(jax.device_get(unet.state.params["unet"])))) > 1e-6
    for got, want in zip(jax.tree.leaves(pipeline.vae_params["params"]),
                         jax.tree.leaves(jax.device_get(vae.state.params))):
        np.testing.assert_array_equal(got, want)
    # auto_scale (tiny): the UNet phase's config, and so the export, got the trained VAE's factor.
    assert config.model.vae.auto_scale
    assert config.model.vae.scaling_factor == pytest.approx(diffusion_train.latent_scaling_factor(
        config, jax.device_get(vae.state.params)), rel=1e-6)
    assert config.model.vae.scaling_factor != 0.18215


@pytest.mark.slow  # two more runs (~1 min each on 2 loaded cores)
def test_two_phase_resume_after_sigterm_equals_uninterrupted(trained, tmp_path, monkeypatch):
    workdir, full = trained
    # SIGTERM while the UNet's 2nd batch is placed: that step finishes, is saved, the run stops;
    # the same command resumes (VAE phase: restore only) and ends bit-identical.
    resumed_dir = str(tmp_path / "resumed")
    to_global = sharding.global_batch_from_host
    calls = []

    def preempt(local_batch, mesh):
        calls.append(1)
        if len(calls) == 2 + 2:  # 2 VAE batches, then the UNet's 2nd
            os.kill(os.getpid(), signal.SIGTERM)
        return to_global(local_batch, mesh)

    monkeypatch.setattr(sharding, "global_batch_from_host", preempt)
    interrupted = _run(resumed_dir)
    monkeypatch.setattr(sharding, "global_batch_from_host", to_global)
    assert interrupted.stopped_by_signal == "SIGTERM" and interrupted.model_dir is None
    assert interrupted.phases["unet"].steps_run == 2
    resumed = _run(resumed_dir)
    assert resumed.phases["vae"].steps_run == 0 and resumed.phases["unet"].steps_run == 2
    assert resumed.model_dir is not None
    for got, want in zip(jax.tree.leaves(jax.device_get(resumed.phases["unet"].state.params)),
                         jax.tree.leaves(jax.device_get(full.phases["unet"].state.params))):
        np.testing.assert_array_equal(got, want)



def test_params_ema_averages_the_weights_after_each_update():
    import jax.numpy as jnp

    from uniecg_jax.train.schema import TrainConfig

    params = {"w": jnp.arange(3.0), "frozen": jnp.full((2,), 5.0)}
    train_cfg = TrainConfig(learning_rate=0.1, warmup_steps=0, steps=10, grad_clip=0.0,
                            freeze="frozen", ema_decay=0.9).to_dict()
    tx, _, _ = optim.make_optimizer(train_cfg, params)
    opt_state = tx.init(params)
    average = dict(params)
    for n in range(1, 6):
        grads = {"w": jnp.asarray([1.0, -2.0, 0.5]) * n, "frozen": jnp.ones(2)}
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        rate = min(0.9, (1 + n) / (10 + n))      # the warmed-up decay
        average = {k: rate * average[k] + (1 - rate) * params[k] for k in params}
    state = state_lib.TrainState(step=jnp.asarray(5), params=params, opt_state=opt_state)
    exported = optim.export_params(state)
    np.testing.assert_allclose(exported["w"], average["w"], rtol=1e-6)
    assert np.abs(np.asarray(exported["w"] - params["w"])).min() > 1e-3  # not the last weights
    np.testing.assert_array_equal(exported["frozen"], np.full((2,), 5.0))
    # Off (the default): no average is kept and the last weights are exported.
    plain_tx, _, _ = optim.make_optimizer(dict(train_cfg, ema_decay=0.0), params)
    plain = state_lib.TrainState(step=jnp.asarray(0), params=params,
                                 opt_state=plain_tx.init(params))
    assert optim.export_params(plain) is params
    with pytest.raises(Exception, match="ema_decay"):
        optim.make_optimizer(dict(train_cfg, ema_decay=1.0), params)


def test_generate_cli_writes_wfdb_that_rdrecord_reads(exported, tmp_path, capsys):
    workdir = exported
    out = str(tmp_path / "gen")
    args = ["generate", "--ckpt", workdir, "--text", "sinus tachycardia", "--hr", "110",
            "--age", "60", "--sex", "F", "--n", "2", "--out", out, "--steps", "3", "--seed", "7",
            "--rate", "500", "--no-png"]
    assert cli_main(args) == 0
    pipeline, config = load_pipeline(workdir)
    embedding = text_encoder_for(config).encode(["sinus tachycardia"])[0]
    expected = pipeline.generate(embedding, "F", 60, 110, n=2, steps=3, seed=7, sample_rate=500)
    for i in range(2):
        record = wfdb.rdrecord(os.path.join(out, f"gen_{i:03d}"))
        assert record.fs == 500 and record.sig_len == 5000 and record.n_sig == 12
        assert record.sig_name[:3] == ["I", "II", "III"] and record.units[0] == "mV"
        # Written in physical units; the only difference is the ADC quantisation.
        np.testing.assert_allclose(record.p_signal.T, expected[i], atol=2e-3)
    info = json.load(open(os.path.join(out, "generation.json")))
    assert info["records"] == ["gen_000", "gen_001"] and info["seed"] == 7

    capsys.readouterr()
    assert cli_main(args[:7] + ["--age", "-5"] + args[9:]) == 1
    assert "age must be in [0, 120]" in capsys.readouterr().err
    assert cli_main(["generate", "--ckpt", workdir, "--hr", "80", "--age", "60", "--sex", "F",
                     "--out", out]) == 1
    assert "--text" in capsys.readouterr().err
    np.save(tmp_path / "wide.npy", np.ones(TEXT_DIM + 5, np.float32))
    assert cli_main(["generate", "--ckpt", workdir, "--embedding", str(tmp_path / "wide.npy"),
                     "--hr", "80", "--age", "60", "--sex", "F", "--out", out]) == 1
    assert "does not match the model's text_embed_dim" in capsys.readouterr().err


def test_generate_cli_switches_the_decoder_conv_algorithm(exported, tmp_path, capsys):
    # Same weights, Winograd convolutions: the records equal the checkpoint's direct decode to
    # float rounding (and the ADC step), and a wrong name is a clear error, not a traceback.
    args = ["generate", "--ckpt", exported, "--text", "sinus tachycardia", "--hr", "110",
            "--age", "60", "--sex", "F", "--n", "2", "--steps", "3", "--seed", "7", "--no-png"]
    assert cli_main(args + ["--out", str(tmp_path / "w"), "--conv-algorithm", "winograd"]) == 0
    pipeline, config = load_pipeline(exported, "winograd")
    assert pipeline.vae.cfg.conv_algorithm == "winograd"
    direct, _ = load_pipeline(exported)
    assert direct.vae.cfg.conv_algorithm == "direct"
    embedding = text_encoder_for(config).encode(["sinus tachycardia"])[0]
    expected = direct.generate(embedding, "F", 60, 110, n=2, steps=3, seed=7)
    for i in range(2):
        record = wfdb.rdrecord(os.path.join(tmp_path, "w", f"gen_{i:03d}"))
        np.testing.assert_allclose(record.p_signal.T, expected[i], atol=2e-3)
    capsys.readouterr()
    assert cli_main(args + ["--out", str(tmp_path / "x"), "--conv-algorithm", "fft"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "conv_algorithm='fft'" in err and "direct, winograd" in err


def test_pipeline_decodes_through_the_fused_kernel_where_chosen(exported, monkeypatch):
    # A Winograd checkpoint decodes through kernels/winograd_conv.py with filters prepared once
    # (forced here; otherwise measured), giving the XLA Winograd decode's ECGs to float rounding;
    # the data-parallel path keeps XLA's convs.
    if native.compiler() is None:
        pytest.skip("no C++ compiler on PATH: the kernel is not built")
    monkeypatch.setenv("UNIECG_WINOGRAD_KERNEL", "1")
    pipeline, config = load_pipeline(exported, "winograd")
    embedding = text_encoder_for(config).encode(["sinus bradycardia"])[0]
    got = pipeline.generate(embedding, "M", 70, 50, n=3, steps=3, seed=2)
    vae, variables = pipeline.decoder_for(3)
    assert vae.native_winograd and "prepared" in variables
    assert pipeline.decoder_for(3)[1] is variables          # prepared once per batch size
    monkeypatch.setenv("UNIECG_WINOGRAD_KERNEL", "0")
    xla_pipeline, _ = load_pipeline(exported, "winograd")
    expected = xla_pipeline.generate(embedding, "M", 70, 50, n=3, steps=3, seed=2)
    assert not xla_pipeline.decoder_for(3)[0].native_winograd
    np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())
    parallel = pipeline.generate(embedding, "M", 70, 50, n=3, steps=3, seed=2, data_parallel=True)
    np.testing.assert_allclose(parallel, expected, atol=2e-5 * np.abs(expected).max())


def test_eval_generate_metrics_on_tiny_run(exported, tmp_path):
    workdir = exported
    out = str(tmp_path / "eval.json")
    # With the decoder's Winograd convolutions (`--conv-algorithm`; the other eval tests run the
    # checkpoint's direct ones).
    results = generate_eval.run_eval(workdir, out, clip_dir=str(tmp_path / "clip"), n=1, steps=2,
                                     max_records=6, clip_steps=3, batch_size=8,
                                     conv_algorithm="winograd")
    saved = json.load(open(out))
    assert saved["num_records"] == 6
    # The heart-rate metric measures what the condition meant: on the real references at 102.4 Hz
    # it reads the rates the records are conditioned on.
    pipeline, config = load_pipeline(workdir, "winograd")
    items = generate_eval.eval_items(diffusion_records(config)[:6], text_encoder_for(config))
    real = ecg_fidelity.heart_rate_mae(items["real"], DIFFUSION_FS, items["hr"])
    assert real["undetected"] == 0 and real["hr_mae"] < 3.0
    for name, guidance in (("model", pipeline.default_guidance), ("baseline_unconditional", 0.0)):
        metrics = results[name]
        np.testing.assert_array_equal(metrics["requested_hr"], items["hr"])
        # Every figure is the metric of the ECGs the job generated (same seed, regenerated here).
        generated = generate_eval.generate_for_items(pipeline, items, n=1, sampler="ddim",
                                                     steps=2, guidance=guidance, seed=0)
        detected = np.array([heart_rate_bpm(ecg, DIFFUSION_FS) for ecg in generated])
        np.testing.assert_array_equal(np.array(metrics["detected_hr"], dtype=float), detected)
        ok = np.isfinite(detected)
        assert metrics["hr_undetected"] == int((~ok).sum())
        expected_mae = np.mean(np.abs(detected[ok] - items["hr"][ok])) if ok.any() else np.nan
        np.testing.assert_allclose(metrics["hr_mae"], expected_mae, rtol=1e-12, equal_nan=True)
        f1 = [generate_eval.aligned_qrs_f1(generate_eval.beat_times(ecg, "kalidas2017"),
                                           generate_eval.beat_times(ref, "kalidas2017"))
              for ecg, ref in zip(generated, items["real"])]
        assert metrics["qrs_f1_vs_reference"] == pytest.approx(np.mean(f1), abs=1e-12)
        assert -1.0 <= metrics["clip_score"] <= 1.0 and metrics["fid"] >= 0
        assert len(metrics["amplitude"]["std_ratio"]) == 12
        assert saved[name]["fid"] == pytest.approx(metrics["fid"])
    # A second run loads the CLIP saved by the first instead of training it again.
    model, variables, config = clip_training.load_clip(str(tmp_path / "clip"))
    assert config.text.encoder == f"hash:{TEXT_DIM}" and model.cfg.text_embed_dim == TEXT_DIM


def test_fid_and_clip_score_closed_forms():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((200, 6))
    assert generate_eval.feature_fid(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    # Same covariance, means apart by `shift`: FID = |shift|^2 exactly.
    assert generate_eval.feature_fid(features, features + shift) == pytest.approx(
        float(shift @ shift), rel=1e-6)
    # N(0, a^2 I) vs N(m, b^2 I) in d dims: |m|^2 + d (a - b)^2.
    d, a, b = 6, 1.5, 0.5
    assert generate_eval.frechet_distance(np.zeros(d), a ** 2 * np.eye(d), shift, b ** 2 * np.eye(d)
                                          ) == pytest.approx(shift @ shift + d * (a - b) ** 2)
    scores = generate_eval.clip_scores(features, 3.0 * features)
    assert scores["clip_score"] == pytest.approx(1.0) and scores["clip_score_100"] == pytest.approx(100)
    assert generate_eval.clip_scores(features, -features)["clip_score_100"] == 0.0
    knn = generate_eval.knn_precision_recall(features, features)
    assert knn["precision"] == knn["recall"] == 1.0
    far = generate_eval.knn_precision_recall(features + 100.0, features)
    assert far["precision"] == far["recall"] == 0.0
    beats = np.array([0.4, 1.2, 2.0, 2.8])
    assert generate_eval.aligned_qrs_f1(beats + 0.33, beats) == pytest.approx(1.0)


def test_ecg_clip_learns_to_pair_ecgs_with_their_text():
    rng = np.random.default_rng(0)
    t = np.arange(1024) / 102.4
    # Two "reports" (slow / fast sinusoid-like rhythms) with two fixed text embeddings.
    texts = np.eye(2, 8, dtype=np.float32)
    labels = np.arange(32) % 2
    ecgs = np.stack([np.sin(2 * np.pi * (1.0 + 1.5 * y) * t + rng.uniform(0, 6))[None].repeat(12, 0)
                     for y in labels]).astype(np.float32)
    model, variables, losses = clip_training.train_clip(ecgs, texts[labels], steps=40,
                                                        batch_size=16, seed=0)
    # 8 copies of each text per batch are all positives, so the loss floor is log(8).
    assert losses[0] > np.log(8) + 0.3 and losses[-1] < np.log(8) + 0.02, losses
    ecg_features = ecg_clip.embed_ecgs(model, variables, ecgs)
    text_features = ecg_clip.embed_texts(model, variables, texts)
    nearest = np.argmax(np.asarray(ecg_clip.normalize(ecg_features)) @
                        np.asarray(ecg_clip.normalize(text_features)).T, axis=1)
    assert (nearest == labels).mean() >= 0.9


def test_convert_diffusets_cli_round_trip(tmp_path):
    import sys
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from diffusets_torch_reference import ECGconditional, vae_decoder, vae_encoder
    from uniecg_jax.convert import diffusets
    from uniecg_jax.models.unet import UNetConfig

    torch.manual_seed(0)
    unet = ECGconditional(steps=1000, kernel_size=7, num_levels=7, n_channels=4, text_embed_dim=24)
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    vae = {"encoder": vae_encoder((128, 256, 512), 32).state_dict(),
           "decoder": vae_decoder((128, 256, 512), 32).state_dict()}
    torch.save(vae, tmp_path / "vae.pth")
    out = str(tmp_path / "model")
    args = _convert_args(["--vae", str(tmp_path / "vae.pth"), "--unet", str(tmp_path / "unet.pth"),
                          "--out", out])
    assert args.handler(args) == 0
    pipeline, config = load_pipeline(out)
    assert config.model.unet.text_embed_dim == 24 and config.text.embed_dim == 24
    want = diffusets.unet_from_torch(unet.state_dict(), UNetConfig(text_embed_dim=24))
    for got, ref in zip(jax.tree.leaves(pipeline.unet_params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    torch.save({"encoder": vae["encoder"]}, tmp_path / "encoder_only.pth")
    args = _convert_args(["--vae", str(tmp_path / "encoder_only.pth"), "--unet",
                          str(tmp_path / "unet.pth"), "--out", out])
    with pytest.raises(CheckpointError, match="encoder_only.pth: needs both encoder and decoder"):
        args.handler(args)


def _convert_args(argv):
    """`uniecg convert diffusets ARGV` parsed by the subcommand's own parser (the lead wires it
    into cli/convert.py)."""
    import argparse

    from uniecg_jax.cli import convert_diffusets

    parser = argparse.ArgumentParser()
    convert_diffusets.add_parser(parser.add_subparsers())
    args = parser.parse_args(["diffusets"] + argv)
    args.config_overrides = []
    return args


def test_latent_scaling_factor_normalises_the_trained_vae_latents():
    """auto_scale: 1 / std of the VAE's latent means, so scaled latents have unit variance."""
    import jax.numpy as jnp

    from uniecg_jax.config import load_config
    from uniecg_jax.layers.params import init_params_on_host
    from uniecg_jax.models.vae import VAE, VAEConfig
    from uniecg_jax.train import diffusion as diffusion_train

    config = load_config("configs/diffusion.py:tiny", ["text.encoder=hash:16",
                                                       "text.embed_dim=16", "data.num_synthetic=0"])
    vae = VAE(VAEConfig.from_config(config.model.vae))
    params = init_params_on_host(vae, 0, jnp.zeros((1, 1024, 12)))["params"]
    factor = diffusion_train.latent_scaling_factor(config, params, max_records=16)
    records = diffusion_records(config)[:16]
    ecgs = np.stack([r.to_diffusion_input() for r in records]).transpose(0, 2, 1)
    _, mean, _ = vae.apply({"params": params}, jnp.asarray(ecgs), method=VAE.encode)
    np.testing.assert_allclose(float(jnp.std(mean)) * factor, 1.0, rtol=1e-4)


def test_data_parallel_generation_equals_one_device(exported):
    pipeline, config = load_pipeline(exported)
    items = generate_eval.eval_items(diffusion_records(config)[:3], text_encoder_for(config))
    common = dict(n=1, sampler="ddim", steps=2, guidance=1.0, seed=5, batch_size=3)
    one = generate_eval.generate_for_items(pipeline, items, **common)
    # 3 rows padded to the 8 simulated devices, sharded; the padding rows are dropped.
    parallel = generate_eval.generate_for_items(pipeline, items, data_parallel=True, **common)
    assert parallel.shape == one.shape == (3, 12, 1024)
    np.testing.assert_allclose(parallel, one, atol=1e-5)


def test_amplitude_moments_merge_like_one_pass():
    rng = np.random.default_rng(0)
    ecgs = rng.standard_normal((7, 12, 50)) * rng.uniform(0.1, 3, (1, 12, 1)) + 0.5
    merged = ecg_fidelity.combine_amplitude_moments(
        [ecg_fidelity.amplitude_moments(ecgs[i:i + 3]) for i in (0, 3, 6)])
    stats = ecg_fidelity.stats_from_moments(merged)
    np.testing.assert_allclose(stats["std"], ecgs.std(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats["mean"], ecgs.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats["peak_to_peak"], np.ptp(ecgs, axis=2).mean(0), rtol=1e-12)


@pytest.mark.slow  # seven sampled blocks on 8 simulated devices: ~7 min on 2 loaded cores
def test_eval_generate_over_two_hosts_writes_each_record_once_and_resumes(exported, tmp_path,
                                                                          capsys):
    from uniecg_jax.eval import sharded_job
    from uniecg_jax.errors import UniECGError
    pipeline, config = load_pipeline(exported)
    text_encoder = text_encoder_for(config)
    records, items = generate_eval.load_items(config, text_encoder, "bundled", max_records=6)
    clip = generate_eval.get_or_train_clip(str(tmp_path / "clip"), records, text_encoder,
                                           str(config.text.encoder), steps=3)
    common = dict(clip=clip, n=1, steps=2, guidance=pipeline.default_guidance, batch_size=2,
                  baseline=False, progress=False)   # the baseline set is rows like the model's
    one = str(tmp_path / "one" / "eval.json")
    os.makedirs(os.path.dirname(one))
    generate_eval.run_shard(pipeline, items, one, process_index=0, process_count=1, **common)
    single = generate_eval.merge(one, 1, items, {})
    out = str(tmp_path / "eval.json")
    generate_eval.run_shard(pipeline, items, out, process_index=0, process_count=2, **common)
    assert generate_eval.merge(out, 2, items, {}) is None   # host 1 has not finished
    # Host 1 uninterrupted, then "killed" after one row and a torn second line, then rerun.
    part0, part1 = (sharded_job.part_path(out, i, 2) for i in (0, 1))
    generate_eval.run_shard(pipeline, items, out, process_index=1, process_count=2, **common)
    with open(part1) as f:
        uninterrupted = f.read().splitlines()
    os.remove(part1 + ".done")
    with open(part1, "w") as f:
        f.write(uninterrupted[0] + "\n" + uninterrupted[1][:50])
    assert generate_eval.merge(out, 2, items, {}) is None
    generate_eval.run_shard(pipeline, items, out, process_index=1, process_count=2, **common)
    with open(part1) as f:   # the torn line was dropped and its record regenerated identically
        assert f.read().splitlines() == uninterrupted
    results = generate_eval.merge(out, 2, items, {"hosts": 2})
    ids = [[json.loads(line)["record_id"] for line in open(p)] for p in (part0, part1)]
    order = items["record_id"]
    # Blocks of --batch-size records alternate between the hosts; each record is written once.
    assert ids == [order[0:2] + order[4:6], order[2:4]]
    # The set-level metrics are computed once over both parts: equal to the one-host job's.
    assert "baseline_unconditional" not in results
    for name in ("model",):
        for key in ("hr_mae", "qrs_f1_vs_reference", "clip_score", "clip_score_real", "fid"):
            np.testing.assert_allclose(results[name][key], single[name][key], rtol=1e-9,
                                       equal_nan=True)
        assert results[name]["knn"] == single[name]["knn"]
        np.testing.assert_allclose(results[name]["amplitude"]["std_ratio"],
                                   single[name]["amplitude"]["std_ratio"], rtol=1e-12)
        assert results[name]["num_generated"] == 6
    assert json.load(open(out))["hosts"] == 2
    # Resuming with other settings would mix two jobs in one part: a clear error.
    with pytest.raises(UniECGError, match="was written with other settings \\(steps"):
        generate_eval.run_shard(pipeline, items, out, process_index=1, process_count=2,
                                **dict(common, steps=3))
    assert cli_main(["eval", "generate", "--ckpt", exported, "--out", out, "--host-index", "2",
                     "--host-count", "2"]) == 1
    assert "--host-index 2 is outside 0..1" in capsys.readouterr().err


class _EchoUnified:
    """Stands in for a stage-2 `UnifiedModel` in `llm_generate_eval`: its `respond` "predicts"
    twice the text encoder's embedding of each request's report (cosine 1, all [ECG] emitted)."""

    def __init__(self, pipeline, text_encoder):
        from types import SimpleNamespace
        self.diffusion, self.text_encoder = pipeline, text_encoder
        self.model = SimpleNamespace(config=SimpleNamespace(num_ecg_tokens=2))

    def respond(self, prompts, max_new_tokens):
        from uniecg_jax.data.chat_format import GENERATION_REQUEST
        reports = [prompt[len(GENERATION_REQUEST):] for prompt in prompts]
        return None, 2.0 * np.asarray(self.text_encoder.encode(reports)), np.ones(len(prompts), bool)


def test_eval_generate_via_llm_is_sharded_too(exported, tmp_path):
    from uniecg_jax.eval import llm_generate_eval, sharded_job
    pipeline, config = load_pipeline(exported)
    text_encoder = text_encoder_for(config)
    records = diffusion_records(config)[:3]
    unified = _EchoUnified(pipeline, text_encoder)
    out = str(tmp_path / "llm.json")
    common = dict(text_encoder=text_encoder, n=1, steps=2, batch_size=2, process_count=2,
                  progress=False)
    assert llm_generate_eval.run(unified, records, out, process_index=0, **common) is None
    metrics = llm_generate_eval.run(unified, records, out, process_index=1, **common)
    ids = [[json.loads(line)["record_id"] for line in open(sharded_job.part_path(out, i, 2))]
           for i in (0, 1)]
    assert ids == [[r.record_id for r in records[:2]], [records[2].record_id]]
    assert metrics["num_records"] == 3 and metrics["emitted_rate"] == 1.0
    np.testing.assert_allclose(metrics["embedding_cosine"]["per_record"], 1.0, atol=1e-6)
    assert metrics["via_llm"]["num_generated"] == metrics["true_embedding"]["num_generated"] == 3
    assert json.load(open(out))["num_records"] == 3
