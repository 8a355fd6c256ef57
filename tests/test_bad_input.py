"""Issue 15: wrong checkpoints and outputs a user can hit get a clear error or a safe default, never a
traceback or a silent loss: checkpoint kinds named by every command (item 7), generated records
never overwritten (item 9), the fast `interpret` path (item 10: plain tokenizer equal to
transformers', inputs checked before the model loads, compilation cache on by default), and no
MFU above 100% (item 12)."""
import os

import jax
import numpy as np
import pytest

from uniecg_jax import caches
from uniecg_jax.checkpoint import checkpoint_kind, load_checked_config, load_model_config
from uniecg_jax.cli import main
from uniecg_jax.config import config_to_json, load_config
from uniecg_jax.data import bundled_record_paths
from uniecg_jax.errors import CheckpointError
from uniecg_jax.inference.interpret import Interpreter
from uniecg_jax.train import loop


def _config_only_checkpoint(directory, spec, workdir=True):
    """A checkpoint whose config.json is `spec`'s (a train workdir's model/ when `workdir`); the
    kind checks run before any weight is read, so no params are needed."""
    model_dir = os.path.join(directory, "model") if workdir else directory
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write(config_to_json(load_config(spec)))
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {kind: _config_only_checkpoint(root / kind, f"configs/{name}.py:tiny")
            for kind, name in (("stage1", "stage1"), ("stage2", "stage2"),
                               ("diffusion", "diffusion"), ("llm", "llm"))}


def test_checkpoint_kinds_are_recognised(checkpoints):
    for kind, path in checkpoints.items():
        assert checkpoint_kind(load_model_config(os.path.join(path, "model"))) == kind


@pytest.mark.parametrize("command, kind, found, advice", [
    (["interpret"], "diffusion", "a diffusion", "use `uniecg generate`"),
    (["interpret"], "stage2", "a stage-2", "use `uniecg chat`"),
    (["interpret"], "llm", "a plain LLM", "train stage 1 from it"),
    (["eval", "interpret", "--out", "OUT"], "stage2", "a stage-2", "use `uniecg chat`"),
    (["chat"], "stage1", "a stage-1", "use `uniecg interpret`"),
    (["generate", "--hr", "70", "--age", "50", "--sex", "F", "--text", "x", "--out", "OUT"],
     "stage1", "a stage-1", "use `uniecg interpret`"),
])
def test_every_command_names_the_checkpoint_kind_it_found(checkpoints, capsys, tmp_path, command,
                                                         kind, found, advice):
    """Item 7: a diffusion workdir or a stage-2 checkpoint given to `interpret` (formerly a 40-line
    AttributeError traceback / "tensors the model has no place for") and the other mix-ups."""
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command] + ["--ckpt", checkpoints[kind]]
    if command[0] == "interpret":
        argv += ["--ecg", bundled_record_paths()[0]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"this is {found}" in err and advice in err and "Traceback" not in err
    assert checkpoints[kind] in err


def test_config_json_that_is_not_json(tmp_path, capsys):
    """Item 7: a damaged config.json is a clear error, not a JSONDecodeError traceback."""
    model_dir = tmp_path / "model"
    os.makedirs(model_dir)
    (model_dir / "config.json").write_text('{"model": {"llm": ')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON \(line 1"):
        Interpreter.load(str(tmp_path))
    assert main(["interpret", "--ckpt", str(tmp_path), "--ecg", bundled_record_paths()[0]]) == 1
    assert "config.json: not valid JSON" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checked_config(str(tmp_path / "absent"), "stage1", "uniecg interpret")


def test_generated_records_are_never_overwritten(tmp_path):
    """Item 9: two requests into the same folder (what `uniecg chat --out D` did: chat_000_000 on
    every call) keep both ECGs; --overwrite replaces on purpose."""
    from uniecg_jax.diffusion.ecg_writer import write_generated

    rng = np.random.default_rng(0)
    first, second = (rng.normal(size=(n, 12, 256)) for n in (2, 1))
    stems = write_generated(first, str(tmp_path), 102.4, prefix="chat", png=False)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    stems += write_generated(second, str(tmp_path), 102.4, prefix="chat", png=False)
    assert [os.path.basename(s) for s in stems] == ["chat_000", "chat_001", "chat_002"]
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data
    import wfdb
    np.testing.assert_allclose(wfdb.rdrecord(stems[2]).p_signal.T, second[0], atol=1e-3)
    again = write_generated(second, str(tmp_path), 102.4, prefix="chat", png=False, overwrite=True)
    assert os.path.basename(again[0]) == "chat_000"
    np.testing.assert_allclose(wfdb.rdrecord(again[0]).p_signal.T, second[0], atol=1e-3)


def test_plain_tokenizer_equals_transformers():
    """Item 10: serving loads the bundled tokenizer with `tokenizers` alone (no transformers
    import); ids, special ids and decoded text equal transformers' for the same files."""
    from uniecg_jax.data.chat_format import InputBuilder
    from uniecg_jax.data.tokenizer import PlainTokenizer, load_serving_tokenizer, load_tokenizer

    plain, reference = load_serving_tokenizer(), load_tokenizer()
    assert isinstance(plain, PlainTokenizer)
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(plain, attribute) == getattr(reference, attribute), attribute
    assert plain.get_vocab() == reference.get_vocab()
    text = "Sinus rhythm, rate 72 <ecg> QRS 96 ms. Ünïcode ✓\n  two  spaces"
    ids = reference.encode(text, add_special_tokens=False)
    assert plain.encode(text, add_special_tokens=False) == ids
    assert plain.convert_tokens_to_ids("<ecg>") == reference.convert_tokens_to_ids("<ecg>")
    assert plain.convert_tokens_to_ids("never-a-token") == reference.unk_token_id
    with_special = [reference.bos_token_id] + ids + [reference.eos_token_id, reference.pad_token_id]
    for skip in (True, False):
        assert plain.decode(with_special, skip_special_tokens=skip) == reference.decode(
            with_special, skip_special_tokens=skip)
    prompt = "Interpret this ECG."
    assert InputBuilder(plain).prompt_ids(prompt, with_ecg=True) == InputBuilder(
        reference).prompt_ids(prompt, with_ecg=True)


def test_bad_ecg_is_reported_before_the_checkpoint_is_touched(tmp_path, capsys):
    """Item 10: a wrong --ecg path fails at once, before the model (here: none at all) loads."""
    assert main(["interpret", "--ckpt", str(tmp_path / "no_model"), "--ecg",
                 str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "missing.hea: WFDB header not found" in err and "no_model" not in err


def test_compilation_cache_is_on_by_default_under_the_cache_home(tmp_path, monkeypatch):
    """Item 10: the CLI's persistent compilation cache lives under $UNIECG_CACHE (default
    ~/.cache/uniecg_jax) and can be turned off."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    try:
        monkeypatch.setenv(caches.CACHE_ENV, str(tmp_path))
        assert caches.enable_compilation_cache() == str(tmp_path / "jax")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
        monkeypatch.setenv(caches.COMPILATION_CACHE_ENV, "0")
        assert caches.enable_compilation_cache() is None
        monkeypatch.delenv(caches.CACHE_ENV)
        assert caches.cache_home() == caches.pathlib.Path.home() / ".cache" / "uniecg_jax"
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def test_mfu_is_never_printed_above_100_percent():
    """Item 12: `mfu 136.4%` was printed against a peak measured under load."""
    assert loop.format_mfu(0.123) == "mfu 12.3%"
    assert loop.format_mfu(1.0) == "mfu 100.0%"
    text = loop.format_mfu(1.364)
    assert "136" not in text and "%" not in text.replace("100%", "") and "unreliable" in text


def test_cpu_peak_is_the_best_of_several_runs_and_cached_per_host(tmp_path, monkeypatch):
    """Item 12: the CPU peak is measured once per host kind (best of PEAK_TRIALS runs) and read
    back from the cache home afterwards; a damaged cache file is measured again."""
    monkeypatch.setenv(caches.CACHE_ENV, str(tmp_path))
    assert jax.devices()[0].platform == "cpu"  # the tests run on CPU: the measured path
    calls = []
    monkeypatch.setattr(loop, "measure_cpu_peak_flops", lambda: calls.append(1) or 4.0e11)
    first, source = loop.peak_flops_per_device()
    second, cached = loop.peak_flops_per_device()
    assert len(calls) == 1 and first == second == 4.0e11 / jax.local_device_count()
    assert source.startswith("measured") and cached.startswith("cached")
    assert loop.host_key() in (tmp_path / loop.PEAK_CACHE_FILE).read_text()
    (tmp_path / loop.PEAK_CACHE_FILE).write_text("{not json")
    loop.peak_flops_per_device()
    assert len(calls) == 2
    monkeypatch.undo()
    assert loop.measure_cpu_peak_flops(trials=3, size=128) > 0
