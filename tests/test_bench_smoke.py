"""Benchmarks run (not timed here): a smoke run of each cheap one, so an API change that breaks a
benchmark fails CI instead of the next person to measure (bench/unified.py went stale once: its
sampler call lacked the rhythm argument `DiffusionPipeline._sampler` gained)."""
import importlib.util
import pathlib

from uniecg_jax.kernels import native

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unified_bench_runs_text_to_ecg_with_the_decision_read_out(capsys):
    _bench("unified").main(["--stage2", "tiny", "--batches", "1", "--steps", "2",
                            "--repeats", "1"])
    out = capsys.readouterr().out
    assert "batch 1: text->ECG" in out and "llm_tokens" in out and "vae_decode" in out


def test_diffusion_bench_compares_both_decoders_with_diffusets_torch(capsys):
    """The `--torch` comparison at the DiffuSETS config, batch 1, one step (~45 s on 2 cores)."""
    _bench("diffusion").main(["--sizes", "diffusets", "--torch", "--skip-train", "--skip-sample",
                              "--batch", "1", "--torch-steps", "1", "--torch-rounds", "1"])
    out = capsys.readouterr().out
    lines = ["one unet", "one decode direct", "one decode winograd", "decode winograd vs direct",
             "ours direct", "ours winograd", "text -> ECG"]
    if native.compiler() is not None:     # the fused kernel builds: it is timed too
        lines += ["one decode winograd-fused", "decode winograd-fused vs direct",
                  "ours winograd-fused"]
    for line in lines:
        assert line in out, line
