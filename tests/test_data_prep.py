"""data_prep: output re-reads equal to the input records, patient-disjoint splits, skip-and-log of
every bad input, all five sources, kill-and-resume giving the same shards, the text encoders."""
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_fixtures import LEADS, write_grounding_file, write_mimic_root, write_ptbxl_root, \
    write_wfdb
from data_prep.prep import PrepOptions, run_prep
from data_prep.sources import SourceOptions
from uniecg_jax.data import bundled_record_paths, load_bundled_records
from uniecg_jax.data.bundled import bundled_split
from uniecg_jax.data.examples import example_to_record, read_shards, read_summary, shard_paths
from uniecg_jax.data.prompts import diffusets_prompt, report_text
from uniecg_jax.data.splits import check_fractions, holdout_fractions, patient_split
from uniecg_jax.data.text_encoder import HashingTextEncoder, TemplatedEncoder, get_text_encoder
from uniecg_jax.errors import UniECGError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prep(out, source, root="", workers=1, shard_size=8, text_encoder="hash:32", overwrite=False,
          runner="local", beam_args=(), **source_kw):
    source_kw.setdefault("build_conversations", False)
    return run_prep(PrepOptions(SourceOptions(source=source, root=str(root), **source_kw),
                                out_dir=str(out), workers=workers, shard_size=shard_size,
                                text_encoder=text_encoder, progress=False, overwrite=overwrite,
                                runner=runner, beam_args=beam_args))


def _all_examples(out):
    return [e for split in ("train", "validation", "test") for e in read_shards(shard_paths(out, split))]


def test_prep_output_rereads_equal_to_input_records(tmp_path):
    summary = _prep(tmp_path, "cinc", "bundled", workers=2, shard_size=8)
    assert summary["num_written"] == 50 and summary["num_skipped"] == 0
    assert sum(summary["num_records"].values()) == 50 and summary["embedding_dim"] == 32
    originals = {r.record_id: r for r in load_bundled_records()}
    examples = _all_examples(tmp_path)
    assert sorted(e["record_id"] for e in examples) == sorted(originals)
    encoder = HashingTextEncoder(32)
    for example in examples:
        original = originals[example["record_id"]]
        np.testing.assert_array_equal(example["signal"], original.signal)
        assert (example["age"], example["sex"], example["labels"]) == (
            original.age, original.sex, list(original.labels))
        np.testing.assert_allclose(example["text_embedding"], encoder.encode([original.report])[0])
    # Splits are by patient: no patient appears in two splits.
    patients = {split: {e["patient_id"] for e in read_shards(shard_paths(tmp_path, split))}
                for split in ("train", "validation", "test")}
    assert not (patients["train"] & patients["validation"]) and not (
        patients["train"] & patients["test"]) and not (patients["validation"] & patients["test"])


def _edit_header(base, old, new):
    with open(base + ".hea") as f:
        text = f.read()
    with open(base + ".hea", "w") as f:
        f.write(text.replace(old, new, 1))


def _bad_inputs_root(root, bundled):
    """Two good Challenge records plus one of each bad kind."""
    os.makedirs(root)
    for path in bundled_record_paths()[:2]:
        for ext in (".hea", ".mat"):
            shutil.copy(path + ext, os.path.join(root, os.path.basename(path) + ext))
    leads = dict(zip(LEADS, bundled[0].signal))
    base = write_wfdb(root, "bad_truncated", leads)
    data = open(base + ".dat", "rb").read()
    open(base + ".dat", "wb").write(data[:1000])
    base = write_wfdb(root, "bad_header", leads)
    open(base + ".hea", "w").write("bad_header 12 five hundred\n")
    base = write_wfdb(root, "bad_leadname", leads)
    _edit_header(base, " V5\n", " Zz\n")
    write_wfdb(root, "bad_missing", {k: v for k, v in leads.items() if k != "aVL"},
               order=[lead for lead in LEADS if lead != "aVL"])
    write_wfdb(root, "bad_flat", {lead: np.full(5000, -0.3) for lead in LEADS})
    base = write_wfdb(root, "bad_rate", leads, fs=500)
    _edit_header(base, " 500 ", " 5 ")
    return {"bad_truncated": "truncated", "bad_header": "corrupt header",
            "bad_leadname": "unknown lead name 'Zz'", "bad_missing": "missing lead(s) aVL",
            "bad_flat": "flat signal", "bad_rate": "unsupported sampling rate 5"}


def test_bad_records_are_skipped_logged_and_good_ones_kept(tmp_path):
    bundled = load_bundled_records()
    expected = _bad_inputs_root(str(tmp_path / "root"), bundled)
    summary = _prep(tmp_path / "out", "cinc", tmp_path / "root", shard_size=3)
    assert summary["num_written"] == 2 and summary["num_skipped"] == len(expected)
    skipped = [json.loads(line) for line in open(tmp_path / "out" / "skipped.jsonl")]
    by_record = {entry["record"]: entry["reason"] for entry in skipped}
    assert set(by_record) == set(expected)
    for record, problem in expected.items():
        assert f"{record}.hea" in by_record[record] and problem in by_record[record], by_record
    assert sorted(e["record_id"] for e in _all_examples(tmp_path / "out")) == ["E07500", "E07501"]
    # With zero-fill the missing-lead record is kept and masked.
    summary = _prep(tmp_path / "zero", "cinc", tmp_path / "root", missing_leads="zero")
    kept = {e["record_id"]: e for e in _all_examples(tmp_path / "zero")}
    assert "bad_missing" in kept and kept["bad_missing"]["lead_mask"].tolist() == [
        lead != "aVL" for lead in LEADS]


def test_grounding_source_keeps_conversations_and_logs_bad_lines(tmp_path):
    ecg_dir = tmp_path / "ecgs"
    for path in bundled_record_paths()[:3]:
        os.makedirs(ecg_dir, exist_ok=True)
        for ext in (".hea", ".mat"):
            shutil.copy(path + ext, ecg_dir / (os.path.basename(path) + ext))
    conversations = tmp_path / "grounding.jsonl"
    write_grounding_file(str(conversations), ["ecgs/E07500", "ecgs/E07501", "ecgs/missing"])
    with open(conversations, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"id": "x", "conversations": [{"from": "human", "value": "q"},
                                                          {"from": "gpt", "value": "a"}]}) + "\n")
    summary = _prep(tmp_path / "out", "grounding", conversations)
    assert summary["num_written"] == 2 and summary["num_skipped"] == 3
    reasons = [json.loads(line)["reason"] for line in open(tmp_path / "out" / "skipped.jsonl")]
    assert any("grounding.jsonl:4: malformed JSON line" in r for r in reasons)
    assert any("grounding.jsonl:5: conversation 'x' has no `ecg` path" in r for r in reasons)
    assert any("missing.hea: WFDB header not found" in r for r in reasons)
    example = sorted(_all_examples(tmp_path / "out"), key=lambda e: e["record_id"])[0]
    assert example["measurements"]["rr_interval"] == 800 and example["heart_rate"] == 75.0
    assert example["record_id"] == "g0" and example["conversation"][1] == (
        "assistant", "Answer 0: sinus rhythm with normal axis.")


def test_mimic_and_ptbxl_sources(tmp_path):
    records = write_mimic_root(str(tmp_path / "mimic"), n=4)
    summary = _prep(tmp_path / "mimic_out", "mimic", tmp_path / "mimic")
    examples = {e["record_id"]: e for e in _all_examples(tmp_path / "mimic_out")}
    assert summary["num_written"] == 4
    np.testing.assert_array_equal(examples["mimic_40000001"]["signal"], records[1].signal)
    assert examples["mimic_40000001"]["patient_id"] == "mimic_10000000"
    assert examples["mimic_40000000"]["measurements"]["rr_interval"] == 800
    # Both studies of a patient land in the same split.
    split_of = {e["record_id"]: split for split in ("train", "validation", "test")
                for e in read_shards(shard_paths(tmp_path / "mimic_out", split))}
    assert split_of["mimic_40000000"] == split_of["mimic_40000001"]
    write_ptbxl_root(str(tmp_path / "ptbxl"), n=3)
    summary = _prep(tmp_path / "ptbxl_out", "ptbxl", tmp_path / "ptbxl")
    assert summary["num_written"] == 3
    reports = {e["record_id"]: e["report"] for e in _all_examples(tmp_path / "ptbxl_out")}
    assert reports["ptbxl_6000"].startswith("sinus rhythm. minor non-specific")


def test_synthetic_source_with_conversations_and_precomputed_embeddings(tmp_path):
    keys = np.array(["synthetic_5_0000000", "synthetic_5_0000001"])
    embeddings = np.random.default_rng(0).normal(size=(2, 1536)).astype(np.float32)
    np.savez(tmp_path / "emb.npz", keys=keys, embeddings=embeddings)
    summary = _prep(tmp_path / "out", "synthetic", num_records=3, seed=5,
                    text_encoder=f"precomputed:{tmp_path / 'emb.npz'}", build_conversations=True)
    assert summary["num_written"] == 2 and summary["embedding_dim"] == 1536
    skipped = [json.loads(line) for line in open(tmp_path / "out" / "skipped.jsonl")]
    assert skipped[0]["record"] == "synthetic_5_0000002" and "no precomputed" in skipped[0]["reason"]
    examples = {e["record_id"]: e for e in _all_examples(tmp_path / "out")}
    np.testing.assert_array_equal(examples["synthetic_5_0000001"]["text_embedding"], embeddings[1])
    example = examples["synthetic_5_0000000"]
    assert example["report"].endswith("bpm. normal ecg.") or "sinus" in example["report"]
    role, answer = example["conversation"][1]
    assert role == "assistant" and f"{round(example['heart_rate'])} bpm" in answer.replace(
        f"{round(example['heart_rate']) - 1} bpm", f"{round(example['heart_rate'])} bpm")


def _copy_records(root, count):
    os.makedirs(root)
    for path in bundled_record_paths()[:count]:
        for ext in (".hea", ".mat"):
            shutil.copy(path + ext, os.path.join(root, os.path.basename(path) + ext))


def _prep_command(root, out):
    return [sys.executable, "-m", "data_prep", "--source", "cinc", "--root", str(root), "--out",
            str(out), "--workers", "1", "--shard-size", "2", "--text-encoder", "hash:16",
            "--no-progress"]


def test_kill_and_resume_produces_the_same_shards(tmp_path):
    _copy_records(tmp_path / "root", 12)
    env = dict(os.environ, PYTHONPATH=REPO)
    out = tmp_path / "resumed"
    # Conversations (QRS detection per record) make each shard take a moment, so the kill lands
    # mid-run: after the first shard is finished, before the last.
    process = subprocess.Popen(_prep_command(tmp_path / "root", out), env=env, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.meta.json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = sorted(p.name for p in out.glob("*.meta.json"))
    assert finished_before, "no shard finished before the kill"
    assert not (out / "summary.json").exists(), "prep finished before the kill; test is vacuous"
    mtimes = {name: os.path.getmtime(out / name) for name in finished_before}
    subprocess.run(_prep_command(tmp_path / "root", out), env=env, cwd=REPO, check=True)
    subprocess.run(_prep_command(tmp_path / "root", tmp_path / "clean"), env=env, cwd=REPO,
                   check=True)
    for name in finished_before:  # finished shards were not redone
        assert os.path.getmtime(out / name) == mtimes[name]
    resumed = sorted(p.name for p in out.iterdir())
    assert resumed == sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert not [name for name in resumed if name.endswith(".tmp")]
    for name in resumed:
        if name.endswith(".array_record"):
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert read_summary(out)["num_written"] == 12


def test_hashing_encoder():
    encoder = get_text_encoder("hash:64")
    vectors = encoder.encode(["sinus rhythm normal ecg", "sinus rhythm normal ecg",
                              "atrial fibrillation"])
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(vectors[0], vectors[1])


def test_diffusets_prompt_is_upstream_prompt_propcess():
    """Strings returned by `prompt_propcess` (utils/text_to_emb.py of PKUDigitalHealth/DiffuSETS at
    b610a00201d02d433a95f0d31eaba059313f7b04) for the same inputs."""
    report = ("Sinus rhythm|Left axis deviation|Low QRS voltages in precordial leads|"
              "Borderline ECG|Abnormal ECG")
    assert diffusets_prompt(report) == (
        "Most importantly, the 1st diagnosis is {Sinus rhythm}."
        "As a supplementary condition, the 2nd diagnosis is {Left axis deviation}."
        "As a supplementary condition, the 3rd diagnosis is {Low QRS voltages in precordial leads}."
        "As a supplementary condition, the 4th diagnosis is {Borderline ECG}."
        "As a supplementary condition, the 5th diagnosis is {Abnormal ECG}.")
    assert diffusets_prompt("a||b|") == (
        "Most importantly, the 1st diagnosis is {a}."
        "As a supplementary condition, the 2nd diagnosis is {}."
        "As a supplementary condition, the 3rd diagnosis is {b}.")
    assert diffusets_prompt("Sinus rhythm. Normal ECG; borderline") == (
        "Most importantly, the 1st diagnosis is {Sinus rhythm. Normal ECG; borderline}.")
    assert diffusets_prompt("") == "" and diffusets_prompt("|") == (
        "Most importantly, the 1st diagnosis is {}.")
    # Labels (MIMIC-IV-ECG report lines) are joined with `|` as DiffuSETS joins them.
    assert report_text("ignored", ("Sinus rhythm", "Normal ECG"), "diffusets") == diffusets_prompt(
        "Sinus rhythm|Normal ECG")
    assert report_text("Sinus rhythm|Normal ECG", (), "plain") == "Sinus rhythm|Normal ECG"


def test_training_encoder_and_prep_read_the_diffusets_prompt(tmp_path):
    class Recorder:
        name, dim = "recorder", 2

        def __init__(self):
            self.texts = []

        def encode(self, texts):
            self.texts += list(texts)
            return np.zeros((len(texts), 2), np.float32)

    recorder = Recorder()
    TemplatedEncoder(recorder, "diffusets").encode(["Sinus rhythm|Normal ECG"])
    assert recorder.texts == [diffusets_prompt("Sinus rhythm|Normal ECG")]

    write_mimic_root(str(tmp_path / "mimic"), n=2)
    run_prep(PrepOptions(SourceOptions(source="mimic", root=str(tmp_path / "mimic"),
                                       build_conversations=False),
                         out_dir=str(tmp_path / "out"), workers=1, shard_size=8,
                         text_encoder="hash:32", prompt_template="diffusets", progress=False))
    encoder = HashingTextEncoder(32)
    for example in _all_examples(tmp_path / "out"):
        record = example_to_record(example)
        assert len(record.labels) >= 2
        expected = encoder.encode([diffusets_prompt("|".join(record.labels))])[0]
        np.testing.assert_array_equal(example["text_embedding"], expected)


def test_patient_split_is_one_deterministic_rule_with_configurable_fractions():
    ids = [f"patient_{i}" for i in range(20000)]
    splits = [patient_split(p, (0.7, 0.2, 0.1)) for p in ids]
    for name, fraction in zip(("train", "validation", "test"), (0.7, 0.2, 0.1)):
        assert splits.count(name) / len(ids) == pytest.approx(fraction, abs=0.015)
    # Another process with another hash seed puts every patient in the same split.
    code = ("from uniecg_jax.data.splits import patient_split; print(''.join(patient_split("
            "f'patient_{i}', (0.7, 0.2, 0.1))[0] for i in range(300)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True)
    assert other.stdout.strip() == "".join(s[0] for s in splits[:300])
    # Pinned: sha256 positions (changing the rule moves every prepared dataset's splits).
    assert [patient_split(p) for p in ("E07500", "mimic_10000000", "ptbxl_15709")] == [
        "test", "train", "train"]
    assert holdout_fractions(5) == (0.8, 0.0, 0.2) and holdout_fractions(0) == (1.0, 0.0, 0.0)
    for bad in ((0.8, 0.3, 0.1), (1.2, -0.1, -0.1), (0.5, 0.5)):
        with pytest.raises(UniECGError, match="split fractions"):
            check_fractions(bad)


def test_prep_and_bundled_data_split_patients_alike(tmp_path):
    """`uniecg prep` of the bundled records and the in-memory bundled split hold out the same
    patients (both train at fraction 0.8: prep's validation + test = bundled test)."""
    _prep(tmp_path, "cinc", "bundled", workers=1, shard_size=64)
    prep_train = {e["record_id"] for e in read_shards(shard_paths(tmp_path, "train"))}
    bundled = bundled_split(5, 0, 0)
    assert prep_train == {r.record_id for r in bundled["train"]}
    assert len(bundled["test"]) >= 5 and prep_train.isdisjoint(r.record_id for r in bundled["test"])


def test_minilm_encoder_real_model():
    encoder = get_text_encoder("minilm")
    vectors = encoder.encode(["sinus rhythm. normal ecg.", "normal sinus rhythm, normal ECG",
                              "atrial fibrillation with rapid ventricular response"])
    assert vectors.shape == (3, 384) and encoder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similar, different = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > 0.8 and different < 0.6 and similar > different + 0.3


def test_tfds_builders_serve_mimic_and_ptbxl_without_tensorflow(tmp_path):
    import importlib.util

    import tensorflow_datasets as tfds

    import data_prep.tfds_builders  # noqa: F401  (registers the builders)

    assert importlib.util.find_spec("tensorflow") is None  # really built without TensorFlow
    ptbxl_records = write_ptbxl_root(str(tmp_path / "ptbxl"), n=10)
    mimic_records = write_mimic_root(str(tmp_path / "mimic"), n=6)
    # A truncated signal file: skipped while every good record is kept.
    dat = tmp_path / "mimic/files/p1000/p10000002/s40000005/40000005.dat"
    dat.write_bytes(dat.read_bytes()[:500])
    data_dir = str(tmp_path / "tfds")
    served = {}
    for name, root in (("uniecg_ptbxl/hash16", "ptbxl"), ("uniecg_mimic_iv_ecg/plain", "mimic")):
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / root)))
        sources = tfds.data_source(name, data_dir=data_dir)
        served[name] = {example["record_id"].decode(): example
                        for split in sources.values() for example in split}
    ptbxl = served["uniecg_ptbxl/hash16"]
    assert sorted(ptbxl) == [f"ptbxl_{6000 + i}" for i in range(10)]
    encoder = HashingTextEncoder(16)
    for i, record in enumerate(ptbxl_records):
        example = ptbxl[f"ptbxl_{6000 + i}"]
        np.testing.assert_array_equal(example["signal"], record.signal)
        assert example["report"].decode() == record.report
        np.testing.assert_allclose(example["text_embedding"], encoder.encode([record.report])[0])
    mimic = served["uniecg_mimic_iv_ecg/plain"]
    assert sorted(mimic) == [f"mimic_4000000{i}" for i in range(5)]
    np.testing.assert_array_equal(mimic["mimic_40000004"]["signal"], mimic_records[4].signal)
    assert mimic["mimic_40000000"]["heart_rate"] == 75.0 and mimic["mimic_40000002"]["heart_rate"] == -1


def test_uniecg_prep_cli(tmp_path, capsys):
    from uniecg_jax.cli import main

    out = tmp_path / "out"
    assert main(["prep", "--source", "cinc", "--root", "bundled", "--out", str(out),
                 "--workers", "1", "--shard-size", "64", "--text-encoder", "hash:8",
                 "--no-conversations", "--no-progress"]) == 0
    assert "wrote 50 records" in capsys.readouterr().out
    assert read_summary(out)["num_written"] == 50
    assert main(["prep", "--source", "cinc", "--root", "bundled", "--out", str(tmp_path / "x"),
                 "--text-encoder", "word2vec", "--no-progress"]) == 1
    assert "unknown text encoder 'word2vec'" in capsys.readouterr().err
    assert main(["prep", "--source", "cinc", "--root", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "y"), "--no-progress"]) == 1
    assert "no WFDB headers" in capsys.readouterr().err


def _outputs(out):
    """{file name: bytes} of a prep output, summary.json without its run time."""
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    summary = json.loads(files.pop("summary.json"))
    summary.pop("seconds_this_run")
    return files, summary


def test_rerun_with_other_options_is_refused_unless_overwrite(tmp_path):
    _copy_records(tmp_path / "root", 6)
    out = tmp_path / "out"
    _prep(out, "cinc", tmp_path / "root", shard_size=2, text_encoder="hash:16")
    (out / "notes.txt").write_text("the user's own file")
    before = {p.name: os.path.getmtime(p) for p in out.iterdir()}
    with pytest.raises(UniECGError, match=r"prepared with other options \(embedding_dim: 16 -> 32; "
                       r"text_encoder: 'hash:16' -> 'hash:32'\); pass --overwrite"):
        _prep(out, "cinc", tmp_path / "root", shard_size=2, text_encoder="hash:32")
    with pytest.raises(UniECGError, match=r"shard_size: 2 -> 3"):
        _prep(out, "cinc", tmp_path / "root", shard_size=3, text_encoder="hash:16")
    assert {p.name: os.path.getmtime(p) for p in out.iterdir()} == before  # nothing touched
    # The same options (the root named another way) resume: no shard is rewritten.
    os.remove(out / "summary.json")
    summary = _prep(out, "cinc", os.path.relpath(tmp_path / "root"), shard_size=2,
                    text_encoder="hash:16")
    assert summary["num_written"] == 6 and all(
        os.path.getmtime(out / name) == mtime for name, mtime in before.items()
        if name.endswith(".array_record"))
    # --overwrite replaces every old output (other shard names included), keeps other files.
    summary = _prep(out, "cinc", tmp_path / "root", shard_size=3, text_encoder="hash:32",
                    overwrite=True)
    assert summary["embedding_dim"] == 32 and summary["num_written"] == 6
    listed = {shard["file"] for shard in summary["shards"]}
    assert {p.name for p in out.glob("*.array_record")} == listed
    assert {len(e["text_embedding"]) for e in _all_examples(out)} == {32}
    assert (out / "notes.txt").read_text() == "the user's own file"
    # A folder with outputs but no fingerprint (an older prep) is refused as well.
    os.remove(out / "prep_options.json")
    with pytest.raises(UniECGError, match="no prep_options.json"):
        _prep(out, "cinc", tmp_path / "root", shard_size=3, text_encoder="hash:32")


def test_uniecg_prep_cli_refuses_other_text_encoder_and_overwrites(tmp_path, capsys):
    from uniecg_jax.cli import main

    out = str(tmp_path / "out")
    command = ["prep", "--source", "cinc", "--root", "bundled", "--out", out, "--workers", "1",
               "--shard-size", "64", "--no-conversations", "--no-progress"]
    assert main(command + ["--text-encoder", "hash:8"]) == 0
    assert main(command + ["--text-encoder", "hash:16"]) == 1
    error = capsys.readouterr().err
    assert "text_encoder: 'hash:8' -> 'hash:16'" in error and "Traceback" not in error
    assert read_summary(out)["embedding_dim"] == 8
    assert main(command + ["--text-encoder", "hash:16", "--overwrite"]) == 0
    assert read_summary(out)["embedding_dim"] == 16


def test_beam_runner_without_apache_beam_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from uniecg_jax.cli import main

    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "data_prep.beam", raising=False)
    assert main(["prep", "--source", "cinc", "--root", "bundled", "--out", str(tmp_path / "out"),
                 "--runner", "direct", "--no-progress"]) == 1
    assert "Beam runners need apache_beam: pip install 'uniecg_jax[beam]'" in (
        capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    assert main(["prep", "--source", "cinc", "--root", "bundled", "--out", "gs://bucket/prep",
                 "--no-progress"]) == 1
    assert "--out gs://bucket/prep: a URL; mount it" in capsys.readouterr().err


def test_beam_direct_runner_writes_the_same_output_as_local(tmp_path):
    pytest.importorskip("apache_beam", reason="the optional `beam` extra is not installed "
                        "(pip install 'uniecg_jax[beam]')")
    from data_prep.beam import pipeline_options

    _bad_inputs_root(str(tmp_path / "root"), load_bundled_records())
    local = _prep(tmp_path / "local", "cinc", tmp_path / "root", shard_size=3)
    direct = _prep(tmp_path / "direct", "cinc", tmp_path / "root", shard_size=3, runner="direct",
                   beam_args=("--direct_num_workers=1",))
    assert local["num_written"] == 2 and local["num_skipped"] == 6
    assert _outputs(tmp_path / "direct") == _outputs(tmp_path / "local")  # bytes, skip log too
    # Resume on Beam after a lost shard rewrites just that shard, identically.
    lost = direct["shards"][0]["file"]
    os.remove(tmp_path / "direct" / lost)
    _prep(tmp_path / "direct", "cinc", tmp_path / "root", shard_size=3, runner="direct")
    assert _outputs(tmp_path / "direct") == _outputs(tmp_path / "local")
    # Pipeline options pass through; --workers maps to DirectRunner processes unless given.
    options = PrepOptions(SourceOptions("cinc"), "o", workers=4, runner="direct",
                          beam_args=("--direct_num_workers=3", "--job_name=x"))
    parsed = pipeline_options(options).get_all_options()
    assert (parsed["runner"], parsed["direct_num_workers"], parsed["job_name"]) == (
        "DirectRunner", 3, "x")
    parsed = pipeline_options(dataclasses.replace(options, beam_args=())).get_all_options()
    assert (parsed["direct_num_workers"], parsed["direct_running_mode"]) == (4, "multi_processing")


def test_prep_measures_each_record_once_with_the_shared_rhythm_rule(tmp_path):
    """The R peaks, QRS rate and conversation that prep stores equal what `with_measured_rhythm`
    and `build_conversation` give on their own (prep reuses one lead-II detection for both)."""
    from uniecg_jax.data.conversations import build_conversation
    from uniecg_jax.data.measure import with_measured_rhythm

    _copy_records(tmp_path / "root", 4)
    _prep(tmp_path / "out", "cinc", tmp_path / "root", build_conversations=True)
    originals = {r.record_id: r for r in load_bundled_records()}
    for example in _all_examples(tmp_path / "out"):
        measured = with_measured_rhythm(originals[example["record_id"]])
        assert example["r_peaks"] == list(measured.r_peaks)
        assert example["measurements"]["qrs_heart_rate"] == round(measured.heart_rate, 2)
        record = example_to_record(example)
        assert example["conversation"] == build_conversation(record)


def test_prep_encodes_each_distinct_report_once_per_worker(monkeypatch):
    """A worker's shards share one cache: a report reaches the encoder the first time the worker
    meets it, every record keeps its own row (none dropped or reordered), and the rows are the
    encoder's own bytes."""
    from types import SimpleNamespace

    from data_prep import prep

    class Recorder:
        name, dim = "recorder", 8

        def __init__(self):
            self.calls = []

        def encode(self, texts):
            self.calls.append(list(texts))
            return HashingTextEncoder(8).encode(texts)

    recorder = Recorder()
    monkeypatch.setattr(prep, "_WORKER_ENCODER", {})
    monkeypatch.setattr(prep, "get_text_encoder", lambda name: recorder)
    options = PrepOptions(SourceOptions("cinc"), "unused", text_encoder="hash:8")
    shards = [["sinus rhythm", "atrial fibrillation", "sinus rhythm"],
              ["normal ecg", "sinus rhythm", "atrial fibrillation", "normal ecg", "sinus rhythm"]]
    for shard, reports in enumerate(shards):
        records = [(SimpleNamespace(record_id=f"s{shard}r{i}", report=text, labels=()), None)
                   for i, text in enumerate(reports)]
        embedded = prep._embed(options, records, [])
        assert [r.record_id for r, _, _ in embedded] == [r.record_id for r, _ in records]
        np.testing.assert_array_equal(np.stack([e for _, _, e in embedded]),
                                      HashingTextEncoder(8).encode(reports))
    assert recorder.calls == [["sinus rhythm", "atrial fibrillation"], ["normal ecg"]]
    prep.reset_embedding_caches()  # a fresh worker's state: the next shard encodes again
    prep._embed(options, records[:1], [])
    assert recorder.calls[-1] == ["normal ecg"]


def test_cached_encoder_keeps_recent_rows_within_its_bound():
    """Eviction never changes a row: past `max_bytes` the least recently used texts are dropped
    and encoded again when they come back."""
    from uniecg_jax.data.text_encoder import CachedTextEncoder

    inner = HashingTextEncoder(16)
    cached = CachedTextEncoder(inner, max_bytes=3 * 16 * 4)  # three rows
    texts = ["a b", "c", "d e f", "a b", "g", "c", "h", "a b"]
    for start in range(0, len(texts), 2):
        chunk = texts[start:start + 2]
        np.testing.assert_array_equal(cached.encode(chunk), inner.encode(chunk))
        assert len(cached) <= 3
    np.testing.assert_array_equal(cached.encode(texts), inner.encode(texts))
    assert cached.encode([]).shape == (0, 16)


def test_minilm_rows_do_not_depend_on_the_batch():
    """A text's MiniLM row is the same bytes alone, in any batch and in any order (prep caches rows
    across shards and workers); the batched path equals one text per forward pass."""
    import torch

    encoder = get_text_encoder("minilm")
    texts = ["Sinus rhythm|Normal ECG", "atrial fibrillation with rapid ventricular response",
             "sinus bradycardia", "left axis deviation. borderline ecg. " * 12, "x", "ST elevation"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as prep runs it
    try:
        together = encoder.encode(texts)
        np.testing.assert_array_equal(encoder.encode(texts[::-1])[::-1], together)
        np.testing.assert_array_equal(np.concatenate([encoder.encode([t]) for t in texts]),
                                      together)
        mixed = encoder.encode(["premature ventricular complexes"] + texts[:3] + ["t wave"])
        np.testing.assert_array_equal(mixed[1:4], together[:3])
        encoder._batched[1] = False  # one text per forward pass: the same bytes
        np.testing.assert_array_equal(encoder.encode(texts), together)
    finally:
        torch.set_num_threads(before)
    assert encoder.encode([]).shape == (0, 384)


@pytest.mark.slow
def test_minilm_prep_writes_the_same_bytes_for_any_worker_count(tmp_path):
    """MiniLM embeddings change in the last bit with torch's thread count; prep encodes on one
    thread everywhere, so one worker (in-process), a pool and Beam write identical shards."""
    _copy_records(tmp_path / "root", 7)
    _prep(tmp_path / "one", "cinc", tmp_path / "root", shard_size=3, text_encoder="minilm")
    _prep(tmp_path / "two", "cinc", tmp_path / "root", workers=2, shard_size=3,
          text_encoder="minilm")
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one")
    if importlib.util.find_spec("apache_beam") is not None:  # optional `beam` extra
        _prep(tmp_path / "beam", "cinc", tmp_path / "root", shard_size=3, text_encoder="minilm",
              runner="direct", beam_args=("--direct_num_workers=2",))
        assert _outputs(tmp_path / "beam") == _outputs(tmp_path / "one")
    # A report's row does not depend on its shard either (rows are cached across shards).
    _prep(tmp_path / "big", "cinc", tmp_path / "root", shard_size=64, text_encoder="minilm")
    rows = {e["record_id"]: e["text_embedding"].tobytes() for e in _all_examples(tmp_path / "one")}
    assert len(rows) == 7 and rows == {e["record_id"]: e["text_embedding"].tobytes()
                                       for e in _all_examples(tmp_path / "big")}


# --- issue 15: bad input never becomes training data; good records are not lost ------------------

def test_prep_skips_misdeclared_records_and_counts_short_ones(tmp_path):
    """Items 1, 2, 8: a header declaring 12 of 13 stored channels and a non-numeric rate are
    skipped with their reasons (they used to be written); a 2 s record is written and counted as
    short, and skipped under --min-seconds 3."""
    bundled = load_bundled_records()
    root = tmp_path / "root"
    _copy_records(root, 2)
    leads = dict(zip(LEADS, bundled[0].signal))
    base = write_wfdb(str(root), "thirteen", dict(leads, V4R=bundled[1].signal[0]),
                      order=list(LEADS) + ["V4R"])
    lines = open(base + ".hea").read().splitlines()
    name, _, *rest = lines[0].split()
    open(base + ".hea", "w").write("\n".join([" ".join([name, "12", *rest])] + lines[1:13]) + "\n")
    base = write_wfdb(str(root), "abc", leads)
    _edit_header(base, " 12 500 5000", " 12 abc 5000")
    write_wfdb(str(root), "two_s", {lead: signal[:1000] for lead, signal in leads.items()})
    summary = _prep(tmp_path / "out", "cinc", root, shard_size=8)
    reasons = {e["record"]: e["reason"] for e in map(json.loads, open(tmp_path / "out" /
                                                                      "skipped.jsonl"))}
    assert set(reasons) == {"thirteen", "abc"}
    assert "more channels or samples are stored than the header declares" in reasons["thirteen"]
    assert "sampling rate 'abc' on the record line is not a number" in reasons["abc"]
    assert summary["num_written"] == 3 and summary["num_short"] == 1
    summary = _prep(tmp_path / "out3", "cinc", root, shard_size=8, min_seconds=3.0)
    assert summary["num_written"] == 2 and summary["num_short"] == 0
    assert summary["min_seconds"] == 3.0


def test_prep_keeps_1000_hz_mimic_records(tmp_path):
    """Item 5: a 1000 Hz record in a MIMIC-IV-ECG root is prepared at its rate, not skipped."""
    from data_fixtures import MIMIC_ORDER
    from uniecg_jax.data.record import resample

    records = write_mimic_root(str(tmp_path / "mimic"), n=3)
    base = tmp_path / "mimic/files/p1000/p10000000/s40000000/40000000"
    write_wfdb(str(base.parent), base.name, dict(zip(LEADS, resample(records[0].signal, 500, 1000))),
               fs=1000, order=MIMIC_ORDER)
    summary = _prep(tmp_path / "out", "mimic", tmp_path / "mimic")
    assert summary["num_written"] == 3 and summary["num_skipped"] == 0
    by_id = {e["record_id"]: e for e in _all_examples(tmp_path / "out")}
    assert by_id["mimic_40000000"]["fs"] == 1000 and by_id["mimic_40000001"]["fs"] == 500


def test_prep_grounding_json_list_with_a_malformed_entry(tmp_path):
    """Item 6 and 9: one malformed entry of a .json list is skipped and logged, the good .json
    entries and a .jsonl beside it are written; skipped.jsonl names entries as the items are
    named (`file#0000001`)."""
    paths = bundled_record_paths()[:3]
    write_grounding_file(str(tmp_path / "g.json"), paths, jsonl=False)
    text = open(tmp_path / "g.json").read()
    open(tmp_path / "g.json", "w").write(text.replace('{"id": "g1", "ecg"', '{"id": "g1" "ecg"'))
    write_grounding_file(str(tmp_path / "h.jsonl"), paths[:1] + [str(tmp_path / "absent")])
    os.makedirs(tmp_path / "conv")
    for name in ("g.json", "h.jsonl"):
        shutil.move(tmp_path / name, tmp_path / "conv" / name)
    summary = _prep(tmp_path / "out", "grounding", tmp_path / "conv")
    assert summary["num_written"] == 3 and summary["num_skipped"] == 2
    reasons = {e["record"]: e["reason"] for e in map(json.loads, open(tmp_path / "out" /
                                                                      "skipped.jsonl"))}
    assert set(reasons) == {"g.json#0000001", "h.jsonl#0000001"}
    assert "malformed JSON entry" in reasons["g.json#0000001"]
    assert "absent.hea: WFDB header not found" in reasons["h.jsonl#0000001"]
