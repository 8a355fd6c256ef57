"""Train step, optimizer, loop and checkpoint resume on the tiny LM."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from uniecg_jax import sharding
from uniecg_jax.config import load_config
from uniecg_jax.train import build_task, lm, optim, state as state_lib, step as step_lib
from uniecg_jax.errors import CheckpointError
from uniecg_jax.layers import params as params_lib
from uniecg_jax.train.checkpointing import RunCheckpointer
from uniecg_jax.train.loop import Phase, enable_compilation_cache, run, train

SEQ = 16  # tokens per row of the hand-made batches


def _tiny(overrides=()):
    """(config, init_params, loss_fn) of the 1-layer tiny LM objective."""
    config = load_config("configs/llm.py:tiny", ["model.num_layers=1", "train.warmup_steps=0",
                                                 *overrides])
    task = build_task(config)
    return config, task.init_params, task.loss_fn


def _batch(rows, seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(rows, SEQ + 1)).astype(np.int32)
    # Masks differ between rows, so microbatches have different token counts.
    mask = (rng.random((rows, SEQ)) < np.linspace(0.2, 1.0, rows)[:, None]).astype(np.int32)
    return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of the same program (the regression run and its resumed copies, the subprocesses)
    compile once; cached executables give identical results."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    directory = str(tmp_path_factory.mktemp("jax_cache"))
    enable_compilation_cache(directory)
    yield directory
    for name, value in previous.items():
        jax.config.update(name, value)


def _one_device_mesh():
    return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def test_next_token_loss_matches_manual_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(7, size=(2, 3))
    mask = np.array([[1, 1, 0], [0, 1, 1]])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    loss, aux = lm.next_token_loss(logits, targets, mask)
    np.testing.assert_allclose(loss, (nll * mask).sum() / 4, rtol=1e-6)
    assert float(aux["num_tokens"]) == 4
    # Row 0's targets are its top logits (all hits); row 1 keeps the random targets.
    targets_on_top = np.where(np.arange(2)[:, None] == 0, logits.argmax(-1), targets)
    _, top = lm.next_token_loss(logits, targets_on_top, mask)
    hits = (logits.argmax(-1) == targets_on_top) * mask
    np.testing.assert_allclose(top["accuracy"], hits.sum() / 4, rtol=1e-6)
    assert float(top["accuracy"]) >= 0.5  # row 0's two counted targets are the top logits
    log_z = np.log(np.exp(logits).sum(-1))
    z_loss, _ = lm.next_token_loss(logits, targets, mask, z_loss=1e-2)
    np.testing.assert_allclose(z_loss, (nll * mask).sum() / 4 + 1e-2 * (log_z ** 2 * mask).sum() / 4,
                               rtol=1e-6)


def test_schedule_warmup_cosine_and_weight_decay_mask():
    config = load_config("configs/llm.py:tiny", ["train.steps=100", "train.warmup_steps=10"])
    schedule = optim.learning_rate_schedule(config.train)
    lr = config.train.learning_rate
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), lr, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), lr * config.train.min_lr_ratio, rtol=1e-6)
    params = {"layers_0": {"mlp": {"up": {"kernel": np.zeros((4, 8))}},
                           "input_norm": {"scale": np.zeros(4)}, "q": {"bias": np.zeros((2, 4))}}}
    mask = optim.weight_decay_mask(params)
    assert mask["layers_0"]["mlp"]["up"]["kernel"]
    assert not mask["layers_0"]["input_norm"]["scale"]
    assert not mask["layers_0"]["q"]["bias"]


def test_grad_accumulation_equals_one_big_batch():
    """k=4 microbatches with different mask counts give the big batch's gradient (SGD lr 1, so
    the param change *is* the gradient)."""
    config, init_params, loss_fn = _tiny()
    mesh = _one_device_mesh()
    tx = optax.sgd(1.0)
    schedule = optax.constant_schedule(1.0)
    results = []
    for accum in (1, 4):
        _, shardings = state_lib.abstract_train_state(init_params, tx, mesh)
        state = state_lib.init_train_state(init_params, tx, mesh, jax.random.PRNGKey(0), shardings)
        labels = jax.tree.map(lambda _: optim.TRAINABLE, state.params)
        before = jax.device_get(state.params)
        step = step_lib.jit_train_step(
            step_lib.make_train_step(loss_fn, tx, schedule, labels, grad_accum_steps=accum),
            shardings, mesh)
        state, metrics = step(state, _batch(8), jax.random.PRNGKey(0))
        grads = jax.tree.map(lambda a, b: b - a, jax.device_get(state.params), before)
        results.append((grads, jax.device_get(metrics)))
    (grads_1, metrics_1), (grads_4, metrics_4) = results
    assert metrics_1["tokens"] == metrics_4["tokens"] == _batch(8)["loss_mask"].sum()
    np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
    assert metrics_1["grad_norm"] > 0
    for g4, g1 in zip(jax.tree.leaves(grads_4), jax.tree.leaves(grads_1)):
        np.testing.assert_allclose(g4, g1, atol=1e-6, rtol=1e-5)
    # An unweighted mean of microbatch means would differ: the test can tell.
    with pytest.raises(ValueError, match="does not split into 3 microbatches"):
        step_lib.split_microbatches(_batch(8), 3)


def test_freezing_by_regex_keeps_params_bit_identical_and_allocates_no_moments():
    config, init_params, loss_fn = _tiny(["train.freeze=^(embedding$|layers_0/attention/)"])
    mesh = _one_device_mesh()
    abstract_params, _ = sharding.abstract_sharded_init(init_params, mesh, jax.random.PRNGKey(0))
    tx, schedule, labels = optim.make_optimizer(config.train, abstract_params)
    _, shardings = state_lib.abstract_train_state(init_params, tx, mesh)
    state = state_lib.init_train_state(init_params, tx, mesh, jax.random.PRNGKey(0), shardings)
    before = jax.device_get(state.params)
    step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx, schedule, labels),
                                   shardings, mesh)
    for i in range(3):
        state, _ = step(state, _batch(8, seed=i), jax.random.PRNGKey(i))
    after = jax.device_get(state.params)
    frozen, trained = 0, 0
    for (path, new), old, label in zip(jax.tree_util.tree_leaves_with_path(after),
                                       jax.tree.leaves(before), jax.tree.leaves(labels)):
        name = params_lib.path_name(path)
        if name == "embedding" or name.startswith("layers_0/attention/"):
            assert label == optim.FROZEN, name
            assert np.array_equal(new, old), f"frozen {name} changed"
            frozen += 1
        else:
            assert label == optim.TRAINABLE, name
            assert not np.array_equal(new, old), f"trained {name} did not change"
            trained += 1
    assert frozen == 5 and trained >= 4  # embedding + q, k, v, out
    # Adam moments exist only for trained params (frozen ones are MaskedNodes, no memory).
    adam = state.opt_state.inner_states[optim.TRAINABLE].inner_state[-1][0]
    assert len(jax.tree.leaves(adam.mu)) == trained
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.freeze_labels(before, "^no_such_module/")


# Fixed-seed regression: the tiny LM (1 layer, synthetic data, batch 8 x 32, 8 devices, fsdp=8).
# If this changes, something changed numerics (model, loss, optimizer, data order): check why.
REGRESSION_OVERRIDES = ["model.num_layers=1", "train.seq_len=32", "train.batch_size=8",
                        "train.data=synthetic", "train.log_every=1", "train.warmup_steps=2",
                        "train.learning_rate=3e-3"]
REGRESSION_LOSSES = {1: 6.243210, 10: 6.115173, 20: 5.739375}


def test_fixed_seed_loss_regression_loss_falls_and_sigterm_resume_is_bit_exact(tmp_path, preempt_at_batch):
    config = load_config("configs/llm.py:tiny", REGRESSION_OVERRIDES + [
        "train.steps=20", "train.checkpoint_every=5"])
    result = train(config, str(tmp_path / "run"), build_task(config))
    losses = {r["step"]: r["loss"] for r in result.history}
    assert sorted(losses) == list(range(1, 21))
    for step, expected in REGRESSION_LOSSES.items():
        np.testing.assert_allclose(losses[step], expected, rtol=2e-4, err_msg=f"step {step}")
    assert losses[20] < losses[1] - 0.3
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(1, 21))
    assert {"loss", "learning_rate", "grad_norm", "tokens"} <= set(lines[-1])
    assert "tokens_per_s" in lines[-1] and "mfu" in lines[-1]

    # Preempted in step 8 (SIGTERM to this process as the 8th batch is placed): the loop finishes
    # that step and writes a final checkpoint at 8; then a second run resumes from it (params, optimizer, data position).
    preempt_at_batch(8)
    # Logging every 5 steps: the metrics of steps 6-8 are flushed at the preemption, not lost.
    config = load_config("configs/llm.py:tiny", REGRESSION_OVERRIDES + [
        "train.steps=20", "train.checkpoint_every=5", "train.log_every=5"])
    task = build_task(config)
    interrupted = train(config, str(tmp_path / "resumed"), task)
    assert interrupted.stopped_by_signal == "SIGTERM" and int(interrupted.state.step) == 8
    preempt_at_batch(None)
    resumed = train(config, str(tmp_path / "resumed"), build_task(config))
    assert resumed.stopped_by_signal is None and resumed.steps_run == 12
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(resumed.state)),
                            jax.tree.leaves(jax.device_get(result.state))):
        assert np.array_equal(a, b), f"{jax.tree_util.keystr(path)} differs after resume"
    resumed_losses = [json.loads(line)["loss"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert resumed_losses == [losses[s] for s in range(1, 21)]

    # The checkpoint records its config; a different model is refused by tensor name, not restored.
    checkpointer = RunCheckpointer(str(tmp_path / "resumed"))
    assert checkpointer.latest_step() == 20
    assert checkpointer.saved_config(20)["model"]["num_layers"] == 1
    checkpointer.close()
    wider = load_config("configs/llm.py:tiny", REGRESSION_OVERRIDES + [
        "train.steps=30", "model.hidden_size=32"])
    with pytest.raises(CheckpointError, match=r"params.embedding: checkpoint has \(512, 64\) float32, "
                                              r"model needs \(512, 32\)"):
        train(wider, str(tmp_path / "resumed"), build_task(wider))


def _cli(workdir, steps, cache_dir):
    """`uniecg train` in a subprocess (8 simulated devices, as in this process)."""
    command = [sys.executable, "-c", "import sys; from uniecg_jax.cli import main; sys.exit(main())",
               "train", "--config", "configs/llm.py:tiny", "--workdir", str(workdir),
               *[f"--config.{o}" for o in REGRESSION_OVERRIDES],
               f"--config.train.steps={steps}", "--config.train.checkpoint_every=20",
               f"--config.train.compilation_cache_dir={cache_dir}"]
    process = subprocess.Popen(command, cwd=os.path.dirname(os.path.dirname(__file__)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ))
    process.lines = []
    reader = threading.Thread(target=lambda: process.lines.extend(iter(process.stdout.readline, "")),
                              daemon=True)
    reader.start()
    process.reader = reader
    return process


def _finish(process, timeout):
    process.wait(timeout=timeout)
    process.reader.join(timeout=10)
    return "".join(process.lines)


def _logged_step(process):
    """Newest `[lm] step N/...` this process printed (0 before its first)."""
    steps = [int(line.split()[2].split("/")[0]) for line in list(process.lines)
             if line.startswith("[lm] step ")]
    return steps[-1] if steps else 0


def _wait_for(condition, process, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process ended early ({process.returncode}):\n{_finish(process, 10)}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def _finalised_steps(workdir):
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()
                  and (p / "commit_success.txt").exists() or p.name.isdigit()
                  and (p / "_CHECKPOINT_METADATA").exists())


def _params(workdir, step):
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, restored["params"])


@pytest.mark.slow
def test_kill_and_sigterm_resume_match_uninterrupted_run_bit_for_bit(tmp_path, compilation_cache):
    """`uniecg train` in subprocesses: SIGKILL after a checkpoint, resume, SIGTERM mid-run (final
    save), resume to the end; final params equal an uninterrupted run's bit for bit (~80 s)."""
    steps = 200
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    config = load_config("configs/llm.py:tiny", REGRESSION_OVERRIDES + [
        f"train.steps={steps}", "train.checkpoint_every=20"])
    train(config, str(reference_dir), build_task(config))

    # 1) SIGKILL right after the first checkpoint is on disk.
    first = _cli(resumed_dir, steps, compilation_cache)
    _wait_for(lambda: _finalised_steps(resumed_dir), first)
    first.kill()
    _finish(first, 60)
    assert first.returncode == -signal.SIGKILL
    killed_at = max(_finalised_steps(resumed_dir))
    assert killed_at < steps

    # 2) Resume, then SIGTERM mid-run: a final checkpoint at the current step, exit status 0.
    second = _cli(resumed_dir, steps, compilation_cache)
    _wait_for(lambda: _logged_step(second) >= killed_at + 5, second)
    second.send_signal(signal.SIGTERM)
    output = _finish(second, 120)
    assert second.returncode == 0, output
    assert f"resumed from {resumed_dir / 'checkpoints'}/{killed_at}" in output
    assert "SIGTERM: saved step" in output, output
    terminated_at = int(output.split("SIGTERM: saved step ")[1].split()[0])
    assert killed_at < terminated_at < steps
    assert terminated_at in _finalised_steps(resumed_dir)

    # 3) Resume to the end.
    third = _cli(resumed_dir, steps, compilation_cache)
    output = _finish(third, 300)
    assert third.returncode == 0, output
    assert f"/{terminated_at}" in output

    want, got = _params(reference_dir, steps), _params(resumed_dir, steps)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert np.array_equal(a, b), f"{jax.tree_util.keystr(path)} differs after resume"
    # The data stream resumed at the right position: every step's loss is identical too.
    losses = lambda d: [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert losses(resumed_dir) == losses(reference_dir)


def test_dry_run_compiles_for_the_mesh_and_donates_the_whole_train_state(capsys):
    """`uniecg dry-run` on 8 simulated devices: the donated (aliased) bytes per device are exactly
    the per-device shards of the train state, so the update needs no second copy of it."""
    from uniecg_jax.cli import main
    from uniecg_jax.train.loop import build_optimizer_and_state

    overrides = ["--config.model.num_layers=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
                 "--config.train.grad_accum_steps=2"]
    assert main(["dry-run", "--config", "configs/llm.py:tiny", "--json", *overrides]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and report["devices"] == 8

    config = load_config("configs/llm.py:tiny", overrides)
    task = build_task(config)
    mesh = sharding.make_mesh(config.mesh)
    _, _, _, abstract_state, _ = build_optimizer_and_state(config, task, mesh)
    shard_bytes = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(abstract_state))
    assert report["alias_bytes"] == shard_bytes
    assert report["output_bytes"] >= shard_bytes
    batch_bytes = 3 * config.train.batch_size * config.train.seq_len * 4 // 4  # 3 int32 [B, T] / (data*fsdp)
    assert report["argument_bytes"] >= shard_bytes + batch_bytes
    assert report["temp_bytes"] > 0
    assert report["num_params"] == task.num_params
    # Per-device FLOPs of the compiled step are in the range of the model estimate / devices
    # (the accumulation scan body is counted once by XLA's cost analysis).
    per_device = task.flops_per_step / 8
    assert per_device / 4 < report["compiler_flops_per_device"] < per_device * 2


def test_run_trains_phases_in_order_from_the_previous_params_exports_and_resumes(tmp_path):
    """`loop.run` over a two-phase task (the shape diffusion's VAE-then-UNet uses): phase `b` starts
    from phase `a`'s final params (at learning rate 0 it ends with them), the last phase's export
    gets its final params, and a rerun restores both phases and trains nothing."""
    config = load_config("configs/llm.py:tiny", REGRESSION_OVERRIDES + [
        "train.steps=2", "train.checkpoint_every=0"])
    frozen = load_config("configs/llm.py:tiny", REGRESSION_OVERRIDES + [
        "train.steps=1", "train.checkpoint_every=0", "train.learning_rate=0.0"])
    seen, exported = [], []

    def phase_a(workdir, previous):
        seen.append(("a", previous))
        return build_task(config)

    def phase_b(workdir, previous):
        seen.append(("b", previous))
        task = build_task(frozen)
        return dataclasses.replace(
            task, initial_params=lambda mesh, abstract: jax.tree.map(
                lambda x, a: jax.device_put(x, a.sharding), previous, abstract),
            export=lambda workdir, params: exported.append(jax.device_get(params)) or workdir)

    task = dataclasses.replace(build_task(config), phases=(Phase("a", phase_a),
                                                           Phase("b", phase_b)))
    result = run(config, str(tmp_path), task)
    assert result.stopped_by_signal is None and result.model_dir == str(tmp_path)
    assert [name for name, _ in seen] == ["a", "b"] and seen[0][1] is None
    assert result.phases["a"].steps_run == 2 and result.phases["b"].steps_run == 1
    assert os.path.isfile(tmp_path / "a" / "metrics.jsonl")
    for got, want in zip(jax.tree.leaves(exported[0]), jax.tree.leaves(seen[1][1])):
        np.testing.assert_array_equal(got, want)
    again = run(config, str(tmp_path), task)
    assert again.phases["a"].steps_run == 0 and again.phases["b"].steps_run == 0
