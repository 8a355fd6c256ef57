"""Generated ECGs written as WFDB records re-read by `wfdb.rdrecord`; PNG on paper grid written."""
import numpy as np
import pytest
import wfdb

from uniecg_jax.data.record import LEADS
from uniecg_jax.diffusion.ecg_writer import plot_ecg_paper, write_generated, write_wfdb
from uniecg_jax.errors import RecordError


@pytest.mark.parametrize("rate,length", [(102.4, 1024), (500.0, 5000)])
def test_wfdb_round_trip(tmp_path, rate, length):
    rng = np.random.default_rng(0)
    ecg = (rng.standard_normal((12, length)) * 0.4).astype(np.float32)
    stem = write_wfdb(ecg, str(tmp_path), "gen_0", rate, comments=["text: sinus tachycardia"])
    record = wfdb.rdrecord(stem)
    assert record.fs == pytest.approx(rate)
    assert record.sig_name == list(LEADS)
    assert record.units == ["mV"] * 12
    assert record.p_signal.shape == (length, 12)
    # 16-bit storage: error within one ADC step of each lead's range.
    step = (ecg.max(axis=1) - ecg.min(axis=1)) / 2 ** 15
    assert np.all(np.abs(record.p_signal.T - ecg) <= step[:, None] + 1e-6)
    assert "text: sinus tachycardia" in record.comments


def test_png_and_batch(tmp_path):
    time = np.arange(1024) / 102.4
    ecgs = np.stack([np.stack([np.sin(2 * np.pi * time + k) for k in range(12)])] * 2)
    stems = write_generated(ecgs, str(tmp_path), 102.4, comments=["hr 60"])
    assert len(stems) == 2
    for stem in stems:
        png = open(stem + ".png", "rb").read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(png[16:20], "big")
        assert width == round(250 / 25.4 * 100)  # 10 s at 25 mm/s = 250 mm at 100 dpi
        assert wfdb.rdrecord(stem).p_signal.shape == (1024, 12)


def test_bad_signal_is_rejected(tmp_path):
    with pytest.raises(RecordError, match=r"expected an ECG \[12, T\]"):
        write_wfdb(np.zeros((8, 100)), str(tmp_path), "bad", 500)
    with pytest.raises(RecordError, match="NaN"):
        plot_ecg_paper(np.full((12, 100), np.nan), 500, str(tmp_path / "x.png"))
