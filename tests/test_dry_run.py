"""`uniecg dry-run`: TPU slice names, the AOT compile for a TPU topology through libtpu, and every 7B
configuration lowering for the dry run."""
import json

import jax
import pytest

from uniecg_jax import aot, sharding
from uniecg_jax.cli import main
from uniecg_jax.config import load_config
from uniecg_jax.errors import UniECGError
from uniecg_jax.train import build_task
from uniecg_jax.train.loop import build_optimizer_and_state, dry_run

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (pip install -e '.[tpu]'); it compiles for TPU topologies")


def test_slice_names_resolve_to_libtpu_topologies():
    v5p = aot.resolve_target("v5p-64")       # 64 TensorCores = 32 megacore chips
    assert (v5p.topology, v5p.chip_config, v5p.num_devices) == ("v5p:2x4x4", "megacore", 32)
    assert v5p.hbm_bytes == 95 * 2 ** 30
    v5e = aot.resolve_target("v5e-8")        # v5e counts chips
    assert (v5e.topology, v5e.num_devices, v5e.hbm_bytes) == ("v5e:2x4", 8, 16 * 2 ** 30)
    assert aot.resolve_target("v5litepod-16").topology == "v5e:4x4"
    assert aot.resolve_target("v4-8").topology == "v4:2x2x1"
    assert aot.resolve_target("v5e:2x2").num_devices == 4
    assert aot.resolve_target("v5p:2x2x1").num_devices == 4
    # What libtpu is told the (absent) host is: Cloud TPU's accelerator type of the slice.
    assert [aot.accelerator_type(aot.resolve_target(n)) for n in
            ("v5e:2x2", "v5p:2x4x4", "v5e-16", "v4-8")] == ["v5litepod-4", "v5p-64",
                                                             "v5litepod-16", "v4-8"]
    for bad, message in (("v5p-7", "no standard v5p slice"), ("v9-8", "expected a Cloud TPU"),
                         ("v5e:2x2x2", "2-D tori"), ("v5p", "expected a Cloud TPU")):
        with pytest.raises(UniECGError, match=message):
            aot.resolve_target(bad)


def test_cpu_dry_run_says_its_temporaries_are_not_a_tpu_plan(capsys):
    assert main(["dry-run", "--config", "configs/llm.py:tiny", "--config.model.num_layers=1",
                 "--per-device-batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "global batch 8" in out  # 1 per device x fsdp 8
    assert "ignores remat" in out and "not a TPU plan" in out


@needs_libtpu
@pytest.mark.slow  # two compiles of the tiny step (TPU and 4 simulated CPUs): ~1 min on 2 cores
def test_tiny_step_compiles_for_a_v5e_topology_below_the_cpu_plan(capsys):
    """The train step compiles for 4 TPU v5e chips through libtpu (no TPU attached); its per-device
    arguments equal the simulated-CPU ones (same shardings) and its peak is below the CPU plan's
    temporaries (the TPU compiler fuses and rematerialises; the CPU one keeps every residual)."""
    args = ["--config", "configs/llm.py:tiny", "--config.model.num_layers=2",
            "--config.train.seq_len=256", "--config.model.remat=full", "--json"]
    assert main(["dry-run", "--topology", "v5e:2x2", *args]) == 0
    tpu = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tpu["platform"] == "tpu" and tpu["device_kind"] == "TPU v5 lite"
    assert tpu["devices"] == 4 and tpu["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert tpu["fits"] and tpu["hbm_bytes_per_device"] == 16 * 2 ** 30

    config = load_config("configs/llm.py:tiny", [a.removeprefix("--config.") for a in args[2:-1]])
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    cpu = dry_run(config, build_task(config), jax.devices()[:4])
    assert cpu["mesh"] == tpu["mesh"] and cpu["global_batch"] == tpu["global_batch"]
    # Same shardings -> the same per-device state shards; the TPU pads small arrays to its tiles.
    _, _, _, abstract_state, _ = build_optimizer_and_state(config, build_task(config), mesh)
    assert tpu["alias_bytes"] >= cpu["alias_bytes"] > 0
    assert tpu["peak_estimate_bytes"] < cpu["temp_bytes"]
    assert tpu["compiler_flops_per_device"] > 0


def test_unknown_slice_and_missing_libtpu_are_clear_errors(monkeypatch, capsys):
    assert main(["dry-run", "--config", "configs/llm.py:tiny", "--topology", "v5e-3"]) == 1
    assert "no standard v5e slice of 3 chips" in capsys.readouterr().err
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    with pytest.raises(UniECGError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
        aot.topology_devices(aot.resolve_target("v5e:2x2"))


SEVEN_B = ["configs/stage1.py:vicuna_7b", "configs/stage1.py:qwen2_5_7b",
           "configs/stage2.py:vicuna_7b", "configs/stage2.py:qwen2_5_7b",
           "configs/diffusion.py:diffusets"]


@pytest.mark.slow  # tracing a 7B train step (abstract: nothing allocated) takes ~30 s each
@pytest.mark.parametrize("config_name", SEVEN_B)
def test_every_large_config_lowers_for_the_dry_run(config_name):
    """Each large configuration builds its task and lowers its full train step (every part
    together: LLM + ECG tower + projectors + alignment head) on an 8-way fsdp mesh."""
    from uniecg_jax.train import step as step_lib
    from uniecg_jax.train.loop import _global_batch_size

    config = load_config(config_name, ["mesh.fsdp=8", "train.batch_size=8",
                                       "train.grad_accum_steps=1"])
    task = build_task(config)
    config = task.config if task.config is not None else config
    mesh = sharding.make_mesh(config.mesh)
    tx, schedule, labels, abstract_state, shardings = build_optimizer_and_state(config, task, mesh)
    step = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, schedule, labels),
                                   shardings, mesh)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
        task.abstract_batch(_global_batch_size(config, mesh)))
    rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32, sharding=sharding.replicated(mesh))
    lowered = step.lower(abstract_state, batch, rng)
    assert "main" in lowered.as_text()[:100000]
    assert sum(x.size for x in jax.tree.leaves(abstract_state.params)) == task.num_params


def test_largest_fitting_batch_searches_powers_of_two_in_few_compiles(monkeypatch):
    """`--per-device-batch max`: with a peak of 10 GiB + 3 GiB per example on 95 GiB, 16 fits
    (58 GiB) and 32 does not (106 GiB); found from batch 1, 2, the extrapolated 16 and the check
    of 32, not by compiling every power of two. A step that never fits gives 0."""
    from uniecg_jax.cli import dry_run as cli

    target = aot.resolve_target("v5p-8")
    compiled = []

    def fake_compile(config, batch, target, devices, fixed=10, slope=3):
        compiled.append(batch)
        peak = (fixed + slope * batch) * 2 ** 30
        return dict(peak_estimate_bytes=peak, fits=peak <= target.hbm_bytes)

    monkeypatch.setattr(cli, "_compile", fake_compile)
    report = cli.largest_fitting_batch(None, target, None)
    assert report["max_per_device_batch"] == 16 and compiled == [1, 2, 16, 32]
    assert report["tried"][32] is None and report["tried"][16] == 58 * 2 ** 30

    # A pessimistic extrapolation (memory that grows less than linearly) keeps doubling.
    compiled.clear()
    peaks = {1: 40, 2: 60, 4: 62, 8: 66, 16: 74, 32: 90, 64: 120}
    monkeypatch.setattr(cli, "_compile", lambda c, b, t, d: (
        compiled.append(b), dict(peak_estimate_bytes=peaks[b] * 2 ** 30,
                                 fits=peaks[b] * 2 ** 30 <= t.hbm_bytes))[1])
    assert cli.largest_fitting_batch(None, target, None)["max_per_device_batch"] == 32
    assert compiled == [1, 2, 4, 8, 16, 32, 64]

    monkeypatch.setattr(cli, "_compile", lambda c, b, t, d: dict(fits=False, compile_error="OOM"))
    assert cli.largest_fitting_batch(None, target, None)["max_per_device_batch"] == 0


def test_stage2_7b_configs_carry_no_image_tower():
    """Stage 2 reads signals only: a stage-1 config with GEM's image tower must not hand its
    `vision_tower` to stage 2 (whose params and preservation batches have no image; with it the
    7B stage-2 step failed to lower: the interpretation loss asked for `ecg_present`)."""
    for name in ("configs/stage2.py:vicuna_7b", "configs/stage2.py:qwen2_5_7b"):
        assert "vision_tower" in load_config(name.replace("stage2", "stage1")).model
        assert "vision_tower" not in load_config(name).model
