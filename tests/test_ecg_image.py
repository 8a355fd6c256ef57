"""ECG images rendered from signals (`data.ecg_image`) on the shared paper layout
(`data.ecg_paper`): the heart rate read back from the rhythm strip's pixels, 12 labelled panels,
seeded bytes."""
import numpy as np
import pytest
from scipy.signal import find_peaks

from uniecg_jax.data.ecg_image import PrintDistortions, _text_mask, render_ecg_image
from uniecg_jax.data.ecg_paper import (MM_PER_INCH, MM_PER_POINT, PAPER_SPEED_MM_S, ROWS_3X4,
                                       paper_layout)
from uniecg_jax.data.measure import heart_rate_bpm
from uniecg_jax.data.record import LEADS
from uniecg_jax.errors import RecordError

RATE = 500.0
DPI = 100


def synthetic_ecg(heart_rate: float, seed: int = 0) -> np.ndarray:
    """neurokit2's ECGSYN lead at `heart_rate`, as 12 leads of varied gain and sign, [12, 5000]."""
    import neurokit2 as nk
    lead = nk.ecg_simulate(duration=10, sampling_rate=int(RATE), heart_rate=heart_rate,
                           heart_rate_std=0.5, random_state=seed)
    gains = np.array([0.8, 1.0, 0.5, -0.9, 0.6, 0.7, -0.6, 0.9, 1.1, 1.2, 1.0, 0.8])
    return gains[:, None] * lead[None, :]


def dark(image: np.ndarray) -> np.ndarray:
    """Trace / text pixels: every channel dark (the red grid keeps R high)."""
    return image.max(axis=2) < 120


@pytest.mark.parametrize("heart_rate", [60.0, 110.0])
def test_rate_read_back_from_the_rhythm_strip(heart_rate):
    ecg = synthetic_ecg(heart_rate)
    image = render_ecg_image(ecg, RATE, dpi=DPI)
    layout = paper_layout(ecg.shape[1], RATE)
    scale = DPI / MM_PER_INCH
    rhythm = layout.traces[-1]
    assert (rhythm.lead, rhythm.start, rhythm.stop) == ("II", 0, ecg.shape[1])
    baseline = rhythm.baseline_mm * scale
    left = int(np.ceil(rhythm.x_mm * scale)) + 1
    right = int((rhythm.x_mm + ecg.shape[1] / RATE * PAPER_SPEED_MM_S) * scale) - 1
    top_row = int(baseline - 15 * scale)     # 1.5 mV above the baseline
    strip = dark(image[top_row:int(baseline + 2 * scale), left:right])
    has_ink = strip.any(axis=0)
    assert has_ink.mean() > 0.95, "the rhythm trace is not where the layout puts it"
    highest = np.where(has_ink, strip.argmax(axis=0), strip.shape[0])
    height_px = (baseline - top_row) - highest          # pixels above the baseline
    px_per_s = PAPER_SPEED_MM_S * scale
    peaks, _ = find_peaks(height_px, height=0.5 * height_px.max(), distance=0.35 * px_per_s)
    image_rate = 60.0 * px_per_s / np.median(np.diff(peaks))
    signal_rate = heart_rate_bpm(ecg, RATE)
    assert abs(image_rate - signal_rate) <= 2.0, (image_rate, signal_rate)
    assert abs(image_rate - heart_rate) <= 2.0, (image_rate, heart_rate)


def test_layout_has_twelve_labelled_panels_and_a_rhythm_strip():
    layout = paper_layout(5000, RATE)
    panels, rhythm = layout.traces[:12], layout.traces[12:]
    assert sorted(t.lead for t in panels) == sorted(LEADS)
    assert [t.lead for t in rhythm] == ["II"] and rhythm[0].stop - rhythm[0].start == 5000
    # Standard arrangement: rows top to bottom, columns of 2.5 s left to right.
    rows = sorted({t.baseline_mm for t in panels})
    columns = sorted({t.x_mm for t in panels})
    assert len(rows) == 3 and len(columns) == 4
    for trace in panels:
        row, column = rows.index(trace.baseline_mm), columns.index(trace.x_mm)
        assert ROWS_3X4[row][column] == trace.lead
        assert (trace.start, trace.stop) == (1250 * column, 1250 * (column + 1))
        assert trace.lead_index == LEADS.index(trace.lead)
    assert rhythm[0].baseline_mm > rows[-1]
    assert [label.text for label in layout.labels] == [t.lead for t in layout.traces]
    gem = paper_layout(5000, RATE, format="12x1")
    assert [t.lead for t in gem.traces] == list(LEADS)
    assert np.all(np.diff([t.baseline_mm for t in gem.traces]) > 0)


def test_every_label_is_printed():
    ecg = np.zeros((12, 5000))       # flat traces: only labels, pulses and ticks are ink
    image = render_ecg_image(ecg, RATE, dpi=DPI)
    layout = paper_layout(5000, RATE)
    scale = DPI / MM_PER_INCH
    size_px = int(round(layout.style.font_pt * MM_PER_POINT * scale))
    for label in layout.labels:
        dx, dy, mask = _text_mask(label.text, size_px)
        top, left = int(round(label.y_mm * scale)) + dy, int(round(label.x_mm * scale)) + dx
        region = dark(image[top:top + mask.shape[0], left:left + mask.shape[1]])
        glyph = mask > 0.6
        assert glyph.sum() >= 8          # ("I" is one pixel wide at 100 dpi)
        assert (region & glyph).sum() >= 0.8 * glyph.sum(), label.text
        # ... and only the glyph: no trace crosses a label.
        assert (region & (mask < 0.05)).sum() <= 0.1 * glyph.sum(), label.text


def test_fixed_seed_gives_identical_bytes():
    ecg = synthetic_ecg(75.0)
    clean = render_ecg_image(ecg, RATE, dpi=DPI)
    assert clean.dtype == np.uint8 and clean.shape == (850, 1100, 3)
    assert render_ecg_image(ecg, RATE, dpi=DPI).tobytes() == clean.tobytes()
    config = PrintDistortions(crease_probability=1.0, shadow_probability=1.0)
    first = render_ecg_image(ecg, RATE, dpi=DPI, distortions=config, seed=5)
    assert render_ecg_image(ecg, RATE, dpi=DPI, distortions=config, seed=5).tobytes() == \
        first.tobytes()
    other = render_ecg_image(ecg, RATE, dpi=DPI, distortions=config, seed=6)
    assert other.shape == first.shape and other.tobytes() != first.tobytes()
    assert np.abs(first.astype(int) - clean).mean() > 2.0     # the distortions did something


def test_png_writer_shares_the_page(tmp_path):
    from PIL import Image

    from uniecg_jax.diffusion.ecg_writer import plot_ecg_paper
    ecg = synthetic_ecg(75.0)
    path = plot_ecg_paper(ecg, RATE, str(tmp_path / "letter.png"), page="letter")
    assert Image.open(path).size == (1100, 850)
    assert render_ecg_image(ecg, RATE, dpi=DPI).shape[:2] == (850, 1100)


def test_bad_records_are_rejected():
    with pytest.raises(RecordError, match=r"expected an ECG \[12, T\]"):
        render_ecg_image(np.zeros((8, 5000)), RATE)
    with pytest.raises(RecordError, match="NaN"):
        render_ecg_image(np.full((12, 5000), np.nan), RATE)
    with pytest.raises(RecordError, match="do not fit a letter page"):
        render_ecg_image(np.zeros((12, 7500)), RATE)
    with pytest.raises(RecordError, match="format"):
        paper_layout(5000, RATE, format="6x2")
