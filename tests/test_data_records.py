"""The canonical record, the readers (bundled Challenge records, MIMIC-IV-ECG, PTB-XL, ECG-Grounding),
resampling, the synthetic generator, and every bad-input case naming the file and the problem."""
import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from data_fixtures import write_grounding_file, write_mimic_root, write_ptbxl_root, \
    write_wfdb
from uniecg_jax.data import (LEADS, bundled_record_paths, bundled_samples_dir,
                             load_bundled_records, read_record, record as record_lib)
from uniecg_jax.data import measure, synthetic
from uniecg_jax.data.readers.grounding import iter_grounding_file, read_grounding_file
from uniecg_jax.data.readers.mimic import MimicDataset
from uniecg_jax.data.readers.ptbxl import PTBXLDataset
from uniecg_jax.errors import RecordError
from uniecg_jax.eval import ecg_fidelity, report_metrics


@pytest.fixture(scope="module")
def bundled():
    return load_bundled_records()


def test_every_bundled_record_reads(bundled):
    import wfdb

    assert len(bundled) == 50
    for path, record in zip(bundled_record_paths(), bundled):
        raw = wfdb.rdrecord(path)
        assert record.signal.shape == (12, 5000) and record.signal.dtype == np.float32
        assert record.fs == 500 and record.lead_mask.all() and record.nan_count == 0
        # Bundled headers list the leads in canonical order, so values must equal wfdb's mV.
        assert list(raw.sig_name) == list(LEADS)
        np.testing.assert_allclose(record.signal, raw.p_signal.T, atol=1e-6)
        assert record.age is not None and record.sex in ("M", "F") and record.report
        assert record.to_encoder_input().shape == (12, 5000)
        assert record.to_diffusion_input().shape == (12, 1024)
    first = bundled[0]
    assert first.record_id == "E07500" and first.age == 78 and first.sex == "M"
    assert first.labels == ("left atrial enlargement", "sinus bradycardia")  # 67741000119109,426177001
    ptbxl = {r.record_id: r for r in bundled}["HR06000"]
    assert ptbxl.report.startswith("sinus rhythm. minor non-specific t wave flattening")
    assert ptbxl.patient_id == "ptbxl_5028" and ptbxl.sex == "F"


def test_assets_are_installed_as_package_data():
    # setup.py ships uniecg_jax/assets/**/*; the folder the package resolves must hold them all.
    root = bundled_samples_dir()
    assert (root / "README.md").exists() and (root / "LICENSE.torch_ecg.txt").exists()
    assert len(list((root / "cinc2021").glob("*.mat"))) == 50


def test_mimic_lead_reordering_report_and_sentinels(tmp_path, bundled):
    write_mimic_root(str(tmp_path), records=bundled[:4])
    header = open(tmp_path / "files/p1000/p10000000/s40000000/40000000.hea").read()
    assert header.index(" aVF") < header.index(" aVL")  # really stored in MIMIC order
    dataset = MimicDataset(tmp_path)
    assert dataset.study_ids() == [40000000, 40000001, 40000002, 40000003]
    for i, study in enumerate(dataset.study_ids()):
        record = dataset.read(study)
        np.testing.assert_allclose(record.signal, bundled[i].signal, atol=1e-6)
        assert record.patient_id == str(10000000 + i // 2)
        assert record.report == f"Sinus rhythm. Study {i}."
        assert record.labels == ("Sinus rhythm", f"Study {i}")
    normal, sentinel = dataset.read(40000000), dataset.read(40000002)
    assert normal.heart_rate == pytest.approx(75.0) and normal.measurements["qrs_axis"] == -10
    assert "p_end" not in normal.measurements  # 29999 is "not measured"
    assert sentinel.heart_rate is None and "rr_interval" not in sentinel.measurements
    assert "qrs_axis" not in sentinel.measurements


def test_ptbxl_reader_verbalises_scp_codes(tmp_path):
    records = write_ptbxl_root(str(tmp_path), n=2)
    dataset = PTBXLDataset(tmp_path)
    assert dataset.ecg_ids() == [6000, 6001]
    record = dataset.read(6000)
    np.testing.assert_allclose(record.signal, records[0].signal, atol=1e-6)
    assert record.labels == ("normal ECG", "non-specific T-wave changes", "sinus rhythm")
    assert record.report.startswith("sinus rhythm. minor") and record.patient_id == "5028"


def test_lead_aliases_extra_channels_and_zero_fill(tmp_path, bundled):
    leads = dict(zip(LEADS, bundled[0].signal))
    names = ["lead i", "MLII", "III", "AVR", "avl", "aVF", "C1", "v2", "V3", "V4", "V5", "V6", "vx"]
    raw = np.stack([leads[l] for l in LEADS] + [np.ones(5000)])
    signal, mask = record_lib.map_leads(raw, names, path="x")
    np.testing.assert_array_equal(signal, bundled[0].signal) and mask.all()
    no_v6 = {k: v for k, v in leads.items() if k != "V6"}
    base = write_wfdb(str(tmp_path), "nov6", no_v6, order=LEADS[:11])
    with pytest.raises(RecordError, match=r"nov6\.hea: missing lead\(s\) V6"):
        read_record(base)
    zero_filled = read_record(base, missing_leads="zero")
    assert not zero_filled.lead_mask[11] and zero_filled.lead_mask[:11].all()
    assert (zero_filled.signal[11] == 0).all()


def test_resampling_preserves_heart_rate_by_qrs_detection(bundled):
    for record in synthetic.generate(3, heart_rates=[48.0, 75.0, 130.0], seed=3):
        at_500 = measure.heart_rate_bpm(record.signal, 500.0)
        at_102 = measure.heart_rate_bpm(record.to_diffusion_input(), record_lib.DIFFUSION_FS)
        assert at_500 == pytest.approx(record.heart_rate, rel=0.02)
        assert at_102 == pytest.approx(record.heart_rate, rel=0.02)
    for record in bundled[:6]:
        before = measure.heart_rate_bpm(record.signal, 500.0)
        after = measure.heart_rate_bpm(record.to_diffusion_input(), record_lib.DIFFUSION_FS)
        assert after == pytest.approx(before, rel=0.02), record.record_id


def test_kalidas_fast_path_equals_neurokit2_calls(bundled, simulated):
    """`measure.kalidas_r_peaks` (cached filter designs, no pandas) gives exactly the peaks of
    neurokit2's `ecg_clean` + `ecg_peaks(method="kalidas2017")` on every lead of bundled records
    (500 Hz), their 102.4 Hz versions upsampled as `detect_r_peaks` does, and simulated ECGs."""
    import warnings

    import neurokit2 as nk

    leads = [(lead, 500) for record in bundled[:4] + simulated[:2] for lead in record.signal]
    leads += [(record_lib.resample(lead[None], record_lib.DIFFUSION_FS, 500.0)[0], 500)
              for record in bundled[4:6] for lead in record.to_diffusion_input()]
    leads += [(bundled[0].signal[1][::2], 250), (np.zeros(5000), 500)]
    total = 0
    for lead, fs in leads:
        lead = np.nan_to_num(np.asarray(lead, np.float64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cleaned = nk.ecg_clean(lead, sampling_rate=fs)
                expected = nk.ecg_peaks(cleaned, sampling_rate=fs, method="kalidas2017")[1]
                expected = np.asarray(expected["ECG_R_Peaks"], np.float64)
            except Exception:
                expected = np.zeros(0)
        got = measure.detect_r_peaks(lead, float(fs))
        np.testing.assert_array_equal(got, expected)
        total += len(got)
    assert total > 300   # the leads do have beats


@pytest.fixture(scope="module")
def simulated():
    """neurokit2-simulated 12-lead ECGs (`ecg_simulate(method="multileads")`, 500 Hz) at known rates."""
    return synthetic.generate(4, heart_rates=[50.0, 75.0, 120.0, 150.0], seed=11)


def test_heart_rate_metric_is_the_conditioning_measurement(simulated):
    """The rate the diffusion model is conditioned on (`with_measured_rhythm` of the 102.4 Hz record)
    and the rate the fidelity metric reads off an ECG are one measurement: equal, within 3 bpm of
    the simulated rate, and in agreement with an independent detector (wfdb XQRS)."""
    from wfdb import processing

    ecgs = np.stack([r.to_diffusion_input() for r in simulated])      # [4, 12, 1024] at 102.4 Hz
    truth = np.array([r.heart_rate for r in simulated])
    unmeasured = [dataclasses.replace(r, heart_rate=None).resampled(record_lib.DIFFUSION_FS)
                  for r in simulated]
    conditioning = np.array([measure.with_measured_rhythm(r).heart_rate for r in unmeasured])
    metric = ecg_fidelity.heart_rate_mae(ecgs, record_lib.DIFFUSION_FS, truth)
    np.testing.assert_array_equal(metric["detected_hr"], conditioning)
    np.testing.assert_allclose(conditioning, truth, atol=3.0)
    assert metric["undetected"] == 0 and metric["hr_mae"] < 3.0
    xqrs_conf = processing.XQRS.Conf(qrs_thr_init=measure.XQRS_INITIAL_THRESHOLD)
    for ecg, rate in zip(ecgs, conditioning):
        lead_ii = record_lib.resample(ecg[1:2], record_lib.DIFFUSION_FS, 500.0)[0]
        beats = processing.xqrs_detect(lead_ii.astype(np.float64), fs=500.0, verbose=False,
                                       conf=xqrs_conf)
        assert 60.0 / np.median(np.diff(beats) / 500.0) == pytest.approx(rate, abs=3.0)
    by_xqrs = ecg_fidelity.heart_rate_mae(ecgs, record_lib.DIFFUSION_FS, truth, method="xqrs")
    np.testing.assert_allclose(by_xqrs["detected_hr"], conditioning, atol=3.0)


def test_resample_is_scipy_polyphase_with_exact_length_for_any_leading_shape():
    """One resampler for records and generated ECGs: resample_poly's default Kaiser(5) filter
    (what `diffusion.pipeline.resample_to` computed too), float32, exactly round(T * ratio)
    samples, over the last axis of [..., T]."""
    import scipy.signal

    rng = np.random.default_rng(0)
    batch = rng.standard_normal((2, 12, 1024)).astype(np.float32)          # generated ECGs
    up = record_lib.resample(batch, record_lib.DIFFUSION_FS, 500.0)
    assert up.shape == (2, 12, 5000) and up.dtype == np.float32
    np.testing.assert_allclose(up, scipy.signal.resample_poly(batch.astype(np.float64), 625, 128,
                                                              axis=-1), atol=1e-5)
    np.testing.assert_array_equal(up[1], record_lib.resample(batch[1], record_lib.DIFFUSION_FS,
                                                             500.0))
    odd = record_lib.resample(batch[0], record_lib.DIFFUSION_FS, 257.0)    # 257/102.4: 1285/512
    assert odd.shape == (12, round(1024 * 257.0 / 102.4))


def test_resample_pad_crop_and_nonfinite():
    t = np.arange(5000) / 500.0
    sine = np.sin(2 * np.pi * 2.0 * t)[None].astype(np.float32)
    down = record_lib.resample(sine, 500.0, 102.4)
    assert down.shape == (1, 1024)
    expected = np.sin(2 * np.pi * 2.0 * np.arange(1024) / 102.4)
    np.testing.assert_allclose(down[0, 50:-50], expected[50:-50], atol=1e-3)  # no edge effects
    assert record_lib.pad_or_crop(sine, 4000).shape == (1, 4000)
    padded = record_lib.pad_or_crop(sine, 6000)
    assert padded.shape == (1, 6000) and (padded[:, 5000:] == 0).all()
    clean, count = record_lib.replace_nonfinite(np.array([[1.0, np.nan, np.inf, -np.inf]]))
    assert count == 3 and clean.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_synthetic_generator_is_deterministic_and_reports_its_rate():
    first, second = synthetic.generate(1, seed=7), synthetic.generate(1, seed=7)
    np.testing.assert_array_equal(first[0].signal, second[0].signal)
    assert first[0].report == second[0].report
    record = synthetic.generate(1, heart_rates=[55.0], seed=0)[0]
    assert record.report == "sinus bradycardia. heart rate 55 bpm. otherwise normal ecg."
    assert record.signal.shape == (12, 5000) and record.heart_rate == 55.0


@pytest.mark.parametrize("rate", [50.0, 72.0, 110.0])
def test_synthetic_labels_are_the_statements_its_report_asserts(rate):
    """Stage 1 is trained to say the report and scored against the labels: they must agree, or a
    perfect model loses precision on every synthetic record ("normal ecg" was unlabelled)."""
    vocab = report_metrics.StatementVocabulary.default()
    report = synthetic.synthetic_report(rate)
    labels = synthetic.synthetic_labels(rate)
    assert report_metrics.extract_statements(report, vocab).present == \
        {vocab.lookup(label) for label in labels}


def test_time_stretch_continues_the_beat_train_across_its_joins():
    """A pulse every 400 samples played 1.6x faster: a pulse every 250 samples over the whole
    output, joins included (a wrap-around would put one 100-160 samples after the last)."""
    train = np.zeros((1, 5000), np.float32)
    peaks = np.arange(150, 5000, 400)
    train[0, peaks] = 1.0
    stretched = synthetic.time_stretch(train, 500.0, 1.6, peaks.astype(float))
    assert stretched.shape == (1, 5000)
    found = np.flatnonzero((stretched[0] > 0.3) & (stretched[0] >= np.roll(stretched[0], 1))
                           & (stretched[0] >= np.roll(stretched[0], -1)))
    assert len(found) >= 19 and set(np.diff(found)) <= {249, 250, 251}


@pytest.mark.parametrize("target", [52.0, 118.0])
def test_stretched_synthetic_ecg_says_the_rate_its_signal_has(simulated, target):
    """A 75 bpm ECG stretched to a new rate: the rate measured on it (`measure.ecg_rhythm`) and an
    independent detector (wfdb XQRS) agree with the target, and its report, labels and grounded
    answer state the measured rate and the rhythm name that rate has."""
    from uniecg_jax.data.conversations import build_conversation

    source = simulated[1]
    copy = synthetic.stretched_to_rate(source, target, "synthetic_x_s0")
    measured = measure.heart_rate_bpm(copy.signal, copy.fs)
    assert abs(measured - target) < 0.04 * target
    assert abs(measure.heart_rate_bpm(copy.signal, copy.fs, method="xqrs") - measured) < 3
    assert copy.heart_rate == round(measured, 1) and copy.signal.shape == source.signal.shape
    assert copy.report == synthetic.synthetic_report(measured)
    assert copy.labels == synthetic.synthetic_labels(measured)
    assert copy.labels[0] == ("sinus bradycardia" if target < 60 else "sinus tachycardia")
    answer = build_conversation(copy)[1][1]
    assert f"at {measured:.0f} bpm" in answer and report_metrics.extract_measurements(
        answer)["heart_rate"] == pytest.approx(measured, abs=1)
    copies = synthetic.stretched_copies([source, dataclasses.replace(source, record_id="E1")],
                                        3, seed=0)
    assert [c.record_id for c in copies] == [f"{source.record_id}_s{k}" for k in range(3)]


def test_cached_synthetic_generates_once_and_recovers_from_a_corrupt_file(tmp_path):
    cache = str(tmp_path / "cache")
    first = synthetic.cached_synthetic(2, seed=3, heart_rates=[60.0, 90.0], cache_dir=cache)
    assert [r.heart_rate for r in first] == [60.0, 90.0]
    (path,) = [os.path.join(cache, name) for name in os.listdir(cache)]
    with open(path, "wb") as f:
        f.write(b"not a pickle")
    again = synthetic.cached_synthetic(2, seed=3, heart_rates=[60.0, 90.0], cache_dir=cache)
    np.testing.assert_array_equal(again[1].signal, first[1].signal)
    os.utime(path, (0, 0))                                  # the next call reads the file
    cached = synthetic.cached_synthetic(2, seed=3, heart_rates=[60.0, 90.0], cache_dir=cache)
    assert os.stat(path).st_mtime == 0 and cached[0].record_id == first[0].record_id
    with open(path, "wb") as f:                             # a file from before synthetic_labels
        pickle.dump([dataclasses.replace(r, labels=("sinus rhythm",)) for r in first], f)
    relabelled = synthetic.cached_synthetic(2, seed=3, heart_rates=[60.0, 90.0], cache_dir=cache)
    assert [r.labels for r in relabelled] == [("sinus rhythm", "normal ECG")] * 2
    other = synthetic.cached_synthetic(2, seed=3, heart_rates=[61.0], cache_dir=cache)
    assert [r.heart_rate for r in other] == [61.0, 61.0] and len(os.listdir(cache)) == 2


# ---- bad input: each names the file and the problem ----

def _copy_bundled(tmp_path, name="E07500"):
    src = bundled_samples_dir() / "cinc2021"
    for ext in (".hea", ".mat"):
        shutil.copy(src / (name + ext), tmp_path / (name + ext))
    return str(tmp_path / name)


def _leads(bundled):
    return dict(zip(LEADS, bundled[0].signal))


def test_truncated_signal_file(tmp_path, bundled):
    base = write_wfdb(str(tmp_path), "trunc", _leads(bundled))
    data = open(base + ".dat", "rb").read()
    open(base + ".dat", "wb").write(data[: len(data) // 2])
    with pytest.raises(RecordError, match=r"trunc\.hea: .*truncated"):
        read_record(base)


def test_header_parsed_once_path_equals_the_checked_path(tmp_path, bundled):
    """A header declaring its length is parsed once (read first, checked after); one that declares
    none takes the checked path (header alone, then the signal): both read the same values, and a
    truncated file is refused on both paths with the same message."""
    from uniecg_jax.data.readers import wfdb_io

    base = _copy_bundled(tmp_path)
    declared = wfdb_io.read_wfdb_signal(base)
    lines = open(base + ".hea").read().splitlines(keepends=True)
    fields = lines[0].split()
    assert fields[3] == "5000"
    open(base + ".hea", "w").write(" ".join(fields[:3]) + "\n" + "".join(lines[1:]))
    inferred = wfdb_io.read_wfdb_signal(base)
    np.testing.assert_array_equal(inferred[0], declared[0])
    assert inferred[1:] == declared[1:]
    np.testing.assert_array_equal(declared[0], bundled[0].signal)
    for header in (lines[0], " ".join(fields[:3]) + "\n"):
        trunc = write_wfdb(str(tmp_path), "trunc", _leads(bundled))
        text = open(trunc + ".hea").read().splitlines(keepends=True)
        text[0] = " ".join(text[0].split()[:3]) + "\n" if header.count(" ") < 3 else text[0]
        open(trunc + ".hea", "w").write("".join(text))
        data = open(trunc + ".dat", "rb").read()
        open(trunc + ".dat", "wb").write(data[: len(data) // 2 + 1])
        with pytest.raises(RecordError, match=r"trunc\.hea: .*(truncated|whole number of frames)"):
            wfdb_io.read_wfdb_signal(trunc)


def test_corrupt_header(tmp_path):
    base = _copy_bundled(tmp_path)
    open(base + ".hea", "w").write("E07500 twelve 500 5000\nnonsense\n")
    with pytest.raises(RecordError, match=r"E07500\.hea: corrupt header"):
        read_record(base)
    with pytest.raises(RecordError, match=r"nothere\.hea: WFDB header not found"):
        read_record(str(tmp_path / "nothere"))


def test_unknown_lead_name(tmp_path):
    base = _copy_bundled(tmp_path)
    header = open(base + ".hea").read().replace(" V4\n", " Q9\n")
    open(base + ".hea", "w").write(header)
    with pytest.raises(RecordError, match=r"E07500\.hea: unknown lead name 'Q9'"):
        read_record(base)


def test_all_nan_and_flat_signals(tmp_path, bundled):
    nan_leads = {lead: np.full(5000, np.nan) for lead in LEADS}
    with pytest.raises(RecordError, match=r"allnan: signal is entirely NaN"):
        record_lib.make_record(np.stack(list(nan_leads.values())), LEADS, 500, path="allnan",
                               record_id="x")
    base = write_wfdb(str(tmp_path), "flat", {lead: np.full(5000, 0.2) for lead in LEADS})
    with pytest.raises(RecordError, match=r"flat\.hea: flat signal"):
        read_record(base)
    some_nan = bundled[0].signal.copy()
    some_nan[3, :10] = np.nan
    record = record_lib.make_record(some_nan, LEADS, 500, path="p", record_id="x")
    assert record.nan_count == 10 and np.isfinite(record.signal).all()


def test_wrong_sampling_rate(tmp_path, bundled):
    base = write_wfdb(str(tmp_path), "slow", _leads(bundled), fs=250)
    with pytest.raises(RecordError, match=r"slow\.hea: sampling rate is 250 Hz but .* 500 Hz"):
        read_record(base, expected_fs=500.0)
    header = open(base + ".hea").read().replace(" 250 ", " 20 ", 1)
    open(base + ".hea", "w").write(header)
    with pytest.raises(RecordError, match=r"slow\.hea: unsupported sampling rate 20"):
        read_record(base)


def test_grounding_reader_and_bad_lines(tmp_path):
    path = str(tmp_path / "g.jsonl")
    write_grounding_file(path, ["files/a/1", "files/b/2"])
    samples = read_grounding_file(path, ecg_root="/data/mimic")
    assert [s.ecg_path for s in samples] == ["/data/mimic/files/a/1", "/data/mimic/files/b/2"]
    assert samples[0].turns[0] == ("user", "<image>\nInterpret this ECG.")
    assert samples[0].turns[1][0] == "assistant" and len(samples[0].turns) == 4
    with open(path, "a") as f:
        f.write('{"id": "broken", "ecg": \n')
        f.write(json.dumps({"id": "noecg", "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}) + "\n")
    results = list(iter_grounding_file(path))
    assert sum(not isinstance(r, RecordError) for r in results) == 2  # good ones kept
    errors = [str(r) for r in results if isinstance(r, RecordError)]
    assert errors[0].startswith(f"{path}:3: malformed JSON line")
    assert errors[1] == f"{path}:4: conversation 'noecg' has no `ecg` path"
    json_path = str(tmp_path / "g.json")
    write_grounding_file(json_path, ["x/1"], jsonl=False)
    assert read_grounding_file(json_path)[0].sample_id == "g0"


# --- issue 15: one record-validation path (wfdb_io.read_wfdb_signal) for every reader -------------

def _rewrite_header(base, edit):
    with open(base + ".hea") as f:
        lines = f.read().splitlines()
    with open(base + ".hea", "w") as f:
        f.write("\n".join(edit(lines)) + "\n")


def test_header_declaring_fewer_channels_than_stored_is_refused(tmp_path, bundled):
    """Item 1: 13 channels interleaved in the .dat, the header declares 12 (byte-wise corruption
    of a wfdb.wrsamp record): wfdb reads it with scrambled leads; we refuse it, naming the sizes."""
    leads = dict(_leads(bundled), V4R=bundled[1].signal[0])
    order = list(LEADS) + ["V4R"]
    base = write_wfdb(str(tmp_path), "thirteen", leads, order=order)
    assert read_record(base).lead_mask.all()  # intact: V4R is a known extra channel, dropped

    def declare_twelve(lines):
        name, n_sig, *rest = lines[0].split()
        assert n_sig == "13"
        return [" ".join([name, "12", *rest])] + lines[1:13]
    _rewrite_header(base, declare_twelve)
    import wfdb
    scrambled = wfdb.rdrecord(base)  # what a reader without the size check got
    assert scrambled.n_sig == 12 and not np.allclose(scrambled.p_signal[:, 5], bundled[0].signal[5],
                                                     atol=1e-2)
    with pytest.raises(RecordError, match=r"thirteen\.hea: .*thirteen\.dat holds 130000 data bytes "
                                          r"but the header declares 12 channel\(s\) .* 5000 "
                                          r"samples \(120000 bytes\)"):
        read_record(base)


def test_non_numeric_sampling_rate_is_refused_not_read_as_250_hz(tmp_path, bundled):
    """Item 2: `name 12 abc 5000`: wfdb falls back to 250 Hz without a word."""
    base = write_wfdb(str(tmp_path), "abc", _leads(bundled))
    _rewrite_header(base, lambda lines: [lines[0].replace(" 12 500 5000", " 12 abc 5000")]
                    + lines[1:])
    import wfdb
    assert wfdb.rdheader(base).fs == 250  # the silent fallback this guards against
    with pytest.raises(RecordError, match=r"abc\.hea: sampling rate 'abc' on the record line is "
                                          "not a number"):
        read_record(base)
    _rewrite_header(base, lambda lines: [" ".join(lines[0].split()[:2])] + lines[1:])
    with pytest.raises(RecordError, match=r"abc\.hea: .* declares no sampling rate"):
        read_record(base)
    # A counter frequency after the rate is still the rate.
    _rewrite_header(base, lambda lines: [lines[0].split()[0] + " 12 500/1000 5000"] + lines[1:])
    assert read_record(base).fs == 500


def test_all_nan_lead_is_masked_or_refused(tmp_path, bundled):
    """Item 4: an all-NaN lead (written by wfdb.wrsamp as the invalid-sample value) is zero-filled
    with lead_mask False, or refused like any missing lead."""
    leads = _leads(bundled)
    leads["V3"] = np.full(5000, np.nan)
    base = write_wfdb(str(tmp_path), "deadv3", leads)
    with pytest.raises(RecordError, match=r"deadv3\.hea: lead\(s\) V3 entirely NaN/Inf"):
        read_record(base)
    record = read_record(base, missing_leads="zero")
    v3 = LEADS.index("V3")
    assert not record.lead_mask[v3] and record.lead_mask.sum() == 11
    assert not record.signal[v3].any() and record.nan_count == 5000


def test_truncated_signal_file_says_how_many_samples(tmp_path, bundled):
    """Item 8: 1000 bytes of a 12-lead format-16 file hold 41 whole samples."""
    base = write_wfdb(str(tmp_path), "cut", _leads(bundled))
    data = open(base + ".dat", "rb").read()
    open(base + ".dat", "wb").write(data[:1000])
    with pytest.raises(RecordError, match=r"cut\.hea: signal file truncated: 41 samples of 5000 "
                                          "expected"):
        read_record(base)
    # The bundled Challenge .mat files (byte offset 24) pass the same size check.
    assert read_record(bundled_record_paths()[0]).num_samples == 5000


def test_short_record_warns_and_min_seconds_refuses(tmp_path, bundled):
    """Item 8: a 2 s record is kept (zero-padded to 10 s) with a warning; min_seconds refuses it."""
    base = write_wfdb(str(tmp_path), "two_s", {k: v[:1000] for k, v in _leads(bundled).items()})
    record = read_record(base)
    warning = record_lib.short_record_warning(record)
    assert "two_s.hea: record is 2 s long" in warning and "80% zeros" in warning
    assert record_lib.short_record_warning(bundled[0]) is None
    with pytest.raises(RecordError, match=r"two_s\.hea: .* shorter than 3 s at 500 Hz"):
        from uniecg_jax.data.readers.cinc import read_cinc_record
        read_cinc_record(base, min_seconds=3.0)


@pytest.mark.parametrize("rate", [250, 1000])
def test_mimic_and_ptbxl_keep_250_and_1000_hz_records(tmp_path, bundled, rate):
    """Item 5: MIMIC-IV-ECG and PTB-XL records at 250/1000 Hz are read at their own rate and
    resampled for the encoder like every other reader's (they used to be skipped)."""
    write_mimic_root(str(tmp_path / "mimic"), n=2)
    dataset = MimicDataset(str(tmp_path / "mimic"))
    study = dataset.study_ids()[0]
    original = dataset.read(study)
    from data_fixtures import MIMIC_ORDER
    stored = record_lib.resample(original.signal, 500, rate)
    base = dataset.record_path(study)
    write_wfdb(os.path.dirname(base), os.path.basename(base), dict(zip(LEADS, stored)), fs=rate,
               order=MIMIC_ORDER)
    record = dataset.read(study)
    assert record.fs == rate and record.num_samples == 10 * rate
    for got, want in zip(record.to_encoder_input(), original.signal):
        assert np.corrcoef(got[100:-100], want[100:-100])[0, 1] > 0.99

    write_ptbxl_root(str(tmp_path / "ptbxl"), n=1)
    ptbxl = PTBXLDataset(str(tmp_path / "ptbxl"))
    ecg_id = ptbxl.ecg_ids()[0]
    base = ptbxl.record_path(ecg_id)
    write_wfdb(os.path.dirname(base), os.path.basename(base),
               dict(zip(LEADS, record_lib.resample(ptbxl.read(ecg_id).signal, 500, rate))),
               fs=rate)
    assert ptbxl.read(ecg_id).fs == rate


def test_ptbxl_reads_records100_when_records500_is_absent(tmp_path):
    """Item 5: a PTB-XL copy holding only records100/ loses no record."""
    write_ptbxl_root(str(tmp_path), n=1)
    ptbxl = PTBXLDataset(str(tmp_path))
    ecg_id = ptbxl.ecg_ids()[0]
    high = ptbxl.read(ecg_id)
    low_base = ptbxl.record_path(ecg_id, high_rate=False)
    write_wfdb(os.path.dirname(low_base), os.path.basename(low_base),
               dict(zip(LEADS, record_lib.resample(high.signal, 500, 100))), fs=100)
    shutil.rmtree(tmp_path / "records500")
    record = ptbxl.read(ecg_id)
    assert record.fs == 100 and record.source_path == low_base + ".hea"


def test_malformed_entry_of_a_json_list_is_skipped_and_named(tmp_path):
    """Item 6: one entry that is not JSON costs only itself; the others are read."""
    paths = bundled_record_paths()[:3]
    write_grounding_file(str(tmp_path / "g.json"), paths, jsonl=False)
    text = open(tmp_path / "g.json").read()
    broken = text.replace('{"id": "g1", "ecg"', '{"id": "g1" "ecg"', 1)  # a comma lost
    open(tmp_path / "g.json", "w").write(broken)
    with pytest.raises(ValueError):
        json.loads(broken)
    entries = list(iter_grounding_file(str(tmp_path / "g.json")))
    assert [type(e).__name__ for e in entries] == ["GroundingSample", "RecordError",
                                                   "GroundingSample"]
    assert "g.json[1]: malformed JSON entry" in str(entries[1])
    assert [e.sample_id for e in entries if not isinstance(e, RecordError)] == ["g0", "g2"]
    from uniecg_jax.data.readers.grounding import entry_key
    assert entry_key(str(tmp_path / "g.json"), 1) == "g.json#0000001"


def _wfdb_reading(base):
    """What wfdb.rdrecord gives, as `read_wfdb_signal` returns it (the reference of the fast path)."""
    import wfdb

    record = wfdb.rdrecord(base)
    factors = {"mv": 1.0, "uv": 1e-3, "v": 1e3}
    signal = record.p_signal.T.astype(np.float32)
    for channel, unit in enumerate(record.units):
        if factors[unit.lower()] != 1.0:
            signal[channel] *= factors[unit.lower()]
    return signal, list(record.sig_name), float(record.fs), list(record.comments)


def test_format16_fast_path_equals_wfdb(tmp_path, bundled):
    """The numpy reader of single-file format-16 records (MIMIC-IV-ECG, PTB-XL, the Challenges)
    gives wfdb.rdrecord's physical signal bit for bit, names, rate and comments; other layouts
    (format 212, two files) are left to wfdb and read the same."""
    import wfdb

    from uniecg_jax.data.readers import wfdb_io

    for path in bundled_record_paths():   # .mat with a 24-byte offset, gain 1000, `16x1+24`
        base = wfdb_io.strip_wfdb_extension(path)
        assert wfdb_io._read_format16(base, base + ".hea") is not None
        got, want = wfdb_io.read_wfdb_signal(base), _wfdb_reading(base)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1:] == want[1:]
    rng = np.random.default_rng(0)
    signal = rng.normal(0, 0.5, (5000, 3))
    signal[10:20, 1] = np.nan                       # format 16's missing sample (-32768)
    cases = {"uv": dict(fmt=["16"] * 3, units=["uV", "mV", "V"], adc_gain=[3.7, 200.0, 2e5],
                        baseline=[-12, 0, 7], sig_name=["I", "II lead", "V1"]),
             "p212": dict(fmt=["212"] * 3, units=["mV"] * 3, adc_gain=[200.0] * 3,
                          baseline=[0] * 3, sig_name=["I", "II", "V1"])}
    for name, kwargs in cases.items():
        wfdb.wrsamp(name, fs=250, p_signal=signal * np.array([1e3, 1, 1e-3]) if name == "uv"
                    else signal, comments=["Age: 61", " Sex: F"], write_dir=str(tmp_path),
                    **kwargs)
        base = str(tmp_path / name)
        fast = wfdb_io._read_format16(base, base + ".hea")
        assert (fast is None) == (name == "p212")
        got, want = wfdb_io.read_wfdb_signal(base), _wfdb_reading(base)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1:] == want[1:] and got[1][1] == ("II lead" if name == "uv" else "II")
        assert np.isnan(got[0][1, 10:20]).all()
