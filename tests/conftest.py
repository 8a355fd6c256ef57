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
