"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with `pytest -m slow` (see README)")


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture
def preempt_at_batch(monkeypatch):
    """`preempt_at_batch(n)`: the n-th global batch placed by the train loop sends SIGTERM to this
    process (the loop finishes that step, saves a final checkpoint and returns, as on a preempted
    pod); `preempt_at_batch(None)` restores normal behaviour."""
    import os
    import signal

    from uniecg_jax import sharding

    to_global = sharding.global_batch_from_host

    def arm(n):
        if n is None:
            monkeypatch.setattr(sharding, "global_batch_from_host", to_global)
            return
        calls = []

        def place(local_batch, mesh):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return to_global(local_batch, mesh)
        monkeypatch.setattr(sharding, "global_batch_from_host", place)
    return arm


@pytest.fixture
def resume_after_preemption(preempt_at_batch):
    """`resume_after_preemption(config, workdir, build_task, at_batch)`: trains `config` in
    `workdir`, preempted (SIGTERM) as batch `at_batch` is placed, checks the loop stopped after that
    step, then reruns the same command to completion and returns the resumed TrainResult."""
    from uniecg_jax.train.loop import train

    def run(config, workdir, build_task, at_batch):
        preempt_at_batch(at_batch)
        interrupted = train(config, workdir, build_task(config))
        preempt_at_batch(None)
        assert interrupted.stopped_by_signal == "SIGTERM" and interrupted.steps_run == at_batch
        return train(config, workdir, build_task(config))
    return run


def assert_trees_equal(got, want) -> None:
    """Every leaf of two pytrees (fetched to host) is bit-identical."""
    import jax
    import numpy as np

    for got_leaf, want_leaf in zip(jax.tree.leaves(jax.device_get(got)),
                                   jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_array_equal(got_leaf, want_leaf)
