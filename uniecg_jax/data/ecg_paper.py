"""ECG paper geometry, the one home of it: where every lead segment, label, calibration pulse and
grid line sits on the page, in millimetres. The matplotlib PNG writer (`diffusion.ecg_writer`) and
the numpy rasteriser that renders images for the image tower (`data.ecg_image`) both draw a
`PaperLayout`; neither computes a position of its own.

Coordinates: millimetres from the page's top-left corner, y downwards (image convention). The grid
is anchored at the bottom-left corner (as matplotlib draws it from the axes origin): vertical lines
at x = k mm, horizontal lines at y = height - k mm, every 5th one major.

Scales are the clinical standard: 25 mm/s, 10 mm/mV, 1 mm minor and 5 mm major squares.

Formats (`format`):
  "3x4"   3 rows x 4 columns of T/4 each (I aVR V1 V4 / II aVL V2 V5 / III aVF V3 V6; column c
          shows samples [c T/4, (c+1) T/4)) plus a full-length lead II rhythm strip below.
  "12x1"  12 rows of the full record, I at the top, V6 at the bottom, no rhythm strip (GEM's own
          PTB-XL images: `gem_generation/ecg-image-generator/gen_ecg.sh`, `--num_columns 1`, its
          config.yaml's reversed `leadNames_12` and the rhythm strip commented out of ecg_plot.py).
Pages (`page`):
  "letter"  ecg-image-kit's default page (codes/ecg-image-generator/ecg_plot.py,
            gen_ecg_image_from_data.py at alphanumericslab/ecg-image-kit@27b90f5): 11 x 8.5 in; row
            height = page height / (rows + 2); traces start x_gap + 0.2 s from the left edge with
            x_gap = floor((page_s - T_s) / 2 / 0.2 s) * 0.2 s; a 1 mV x 0.2 s calibration pulse at
            the start of each row; lead names 7 mm below each baseline at the trace start; the
            rhythm strip's baseline 3 mm above the middle of the bottom row (its name 8 mm below
            it); thick column separators of +-3.15 mm; "25mm/s" and "10mm/mV" printed at the
            bottom; red grid (major (1, 0, 0), minor (0.996, 0.8745, 0.8588)), 0.5 pt grid lines,
            0.75 pt traces, 11 pt names.
  "tight"   the page fitted to the traces (the writer's PNGs): width = duration at 25 mm/s, 30 mm
            (+-1.5 mV) per row, names 8 mm above each baseline, no pulse, pink grid.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from uniecg_jax.data.record import LEADS
from uniecg_jax.errors import RecordError

PAPER_SPEED_MM_S = 25.0
GAIN_MM_MV = 10.0
MINOR_MM = 1.0
MAJOR_EVERY = 5            # every 5th minor line is a major one (5 mm = 0.2 s = 0.5 mV)
MM_PER_INCH = 25.4
MM_PER_POINT = MM_PER_INCH / 72.0

FORMATS = ("3x4", "12x1")
PAGES = ("letter", "tight")
# Rows of the 3x4 format, top to bottom (the standard 12-lead printout).
ROWS_3X4 = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
RHYTHM_LEAD = "II"


@dataclasses.dataclass(frozen=True)
class PaperStyle:
    """Colours (RGB 0-255) and line widths (points) of a page."""
    grid_minor_rgb: tuple[int, int, int]
    grid_major_rgb: tuple[int, int, int]
    grid_minor_pt: float
    grid_major_pt: float
    trace_pt: float
    pulse_pt: float
    separator_pt: float
    font_pt: float


LETTER_STYLE = PaperStyle(grid_minor_rgb=(254, 223, 219), grid_major_rgb=(255, 0, 0),
                          grid_minor_pt=0.5, grid_major_pt=0.5, trace_pt=0.75, pulse_pt=1.125,
                          separator_pt=2.25, font_pt=11.0)
TIGHT_STYLE = PaperStyle(grid_minor_rgb=(244, 198, 198), grid_major_rgb=(224, 128, 128),
                         grid_minor_pt=0.3, grid_major_pt=0.7, trace_pt=0.6, pulse_pt=0.9,
                         separator_pt=1.8, font_pt=7.0)


@dataclasses.dataclass(frozen=True)
class Trace:
    """Samples [start, stop) of lead `lead` (index into `LEADS`), drawn from x_mm with 0 mV at
    baseline_mm."""
    lead: str
    lead_index: int
    start: int
    stop: int
    x_mm: float
    baseline_mm: float


@dataclasses.dataclass(frozen=True)
class Text:
    """`text` with its left end on the baseline point (x_mm, y_mm), or centred on x when
    `centred`."""
    text: str
    x_mm: float
    y_mm: float
    centred: bool = False


@dataclasses.dataclass(frozen=True)
class PaperLayout:
    """Everything drawn on one page, in mm (see the module docstring for the frame).

    traces: the 12 lead segments, then the rhythm strip if any; labels: one per trace, same order;
    pulses: (x_mm, baseline_mm, width_mm) of 1 mV calibration pulses; separators: (x_mm, y0_mm,
    y1_mm) thick vertical ticks between columns; notes: other printed text (scale, title).
    """
    width_mm: float
    height_mm: float
    sample_rate: float
    traces: tuple[Trace, ...]
    labels: tuple[Text, ...]
    pulses: tuple[tuple[float, float, float], ...]
    separators: tuple[tuple[float, float, float], ...]
    notes: tuple[Text, ...]
    style: PaperStyle

    @property
    def mm_per_sample(self) -> float:
        return PAPER_SPEED_MM_S / self.sample_rate

    def grid_lines(self) -> tuple[list[tuple[float, bool]], list[tuple[float, bool]]]:
        """([(x_mm, is_major)], [(y_mm, is_major)]): every 1 mm line on the page, anchored at the
        bottom-left corner."""
        xs = [(k * MINOR_MM, k % MAJOR_EVERY == 0)
              for k in range(int(math.floor(self.width_mm / MINOR_MM + 1e-9)) + 1)]
        ys = [(self.height_mm - k * MINOR_MM, k % MAJOR_EVERY == 0)
              for k in range(int(math.floor(self.height_mm / MINOR_MM + 1e-9)) + 1)]
        return xs, ys

    def trace_points(self, trace: Trace, ecg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x_mm [n], y_mm [n]) of one trace of `ecg` `[12, T]` in mV (y downwards)."""
        values = np.asarray(ecg[trace.lead_index, trace.start:trace.stop], dtype=np.float64)
        xs = trace.x_mm + np.arange(values.shape[0]) * self.mm_per_sample
        return xs, trace.baseline_mm - values * GAIN_MM_MV


def checked_twelve_leads(ecg: np.ndarray, what: str) -> np.ndarray:
    """`ecg` as float64 `[12, T]`; RecordError naming `what` (a file, a caller) if it has another
    shape or holds NaN / Inf (what every page drawer needs)."""
    ecg = np.asarray(ecg, dtype=np.float64)
    if ecg.ndim != 2 or ecg.shape[0] != len(LEADS):
        raise RecordError(f"{what}: expected an ECG [12, T], got shape {ecg.shape}")
    if not np.all(np.isfinite(ecg)):
        raise RecordError(f"{what}: signal contains NaN or Inf")
    return ecg


def pulse_points(x_mm: float, baseline_mm: float, width_mm: float, step_mm: float) -> tuple:
    """Corner points (xs, ys) of a 1 mV calibration pulse: 0 mV for two sample steps, 1 mV, back
    to 0 mV for the last two (ecg-image-kit's `dc_pulse`: ones with two zeros at either end)."""
    rise, fall = x_mm + step_mm, x_mm + width_mm + 2 * step_mm
    top = baseline_mm - GAIN_MM_MV
    xs = (x_mm, rise, rise + step_mm, fall - step_mm, fall, fall + step_mm)
    ys = (baseline_mm, baseline_mm, top, top, baseline_mm, baseline_mm)
    return xs, ys


def paper_layout(num_samples: int, sample_rate: float, format: str = "3x4",
                 page: str = "letter", title: str | None = None) -> PaperLayout:
    """The layout of a 12-lead record of `num_samples` at `sample_rate` Hz (see module docstring).

    Raises RecordError when the record is empty or does not fit the page (letter: at most ~11 s).
    """
    if format not in FORMATS:
        raise RecordError(f"ECG paper format {format!r}: choose from {FORMATS}")
    if page not in PAGES:
        raise RecordError(f"ECG paper page {page!r}: choose from {PAGES}")
    if num_samples < 8 or sample_rate <= 0:
        raise RecordError(f"ECG paper: need at least 8 samples at a positive rate, got "
                          f"{num_samples} at {sample_rate} Hz")
    duration_mm = num_samples / sample_rate * PAPER_SPEED_MM_S
    if format == "3x4":
        columns, per_column = 4, int(round(num_samples / 4))
        grid = [[(name, r, c) for c, name in enumerate(row)] for r, row in enumerate(ROWS_3X4)]
        rows = len(ROWS_3X4) + 1             # + the rhythm strip
    else:
        columns, per_column = 1, num_samples
        grid = [[(name, r, 0)] for r, name in enumerate(LEADS)]
        rows = len(LEADS) + 1                # GEM kept the (empty) rhythm row in the row height
    segment_mm = per_column * PAPER_SPEED_MM_S / sample_rate
    lead_rows = len(grid)

    if page == "letter":
        style = LETTER_STYLE
        width_mm, height_mm = 11.0 * MM_PER_INCH, 8.5 * MM_PER_INCH
        row_mm = height_mm / (rows + 2)
        page_s, duration_s = width_mm / PAPER_SPEED_MM_S, duration_mm / PAPER_SPEED_MM_S
        gap_mm = math.floor((page_s - duration_s) / 2 / 0.2) * 0.2 * PAPER_SPEED_MM_S
        pulse_mm = 0.2 * PAPER_SPEED_MM_S
        if gap_mm < 0:
            raise RecordError(f"ECG paper: {duration_s:.2f} s do not fit a letter page "
                              f"({page_s:.2f} s at 25 mm/s)")
        left_mm = gap_mm + pulse_mm

        def baseline(row: int) -> float:        # lead rows from the top; bottom row = rhythm
            return height_mm - (lead_rows - row + 0.5) * row_mm
        rhythm_baseline = height_mm - (row_mm / 2 + 0.3 * GAIN_MM_MV)
        label_dy, pulses_on = 0.7 * GAIN_MM_MV, True
    else:
        style = TIGHT_STYLE
        row_mm = 30.0
        width_mm, height_mm = duration_mm, rows * row_mm if format == "3x4" else lead_rows * row_mm
        gap_mm, pulse_mm, left_mm = 0.0, 0.0, 0.0

        def baseline(row: int) -> float:
            return (row + 0.5) * row_mm
        rhythm_baseline = height_mm - 0.5 * row_mm
        label_dy, pulses_on = -8.0, False

    traces, labels, pulses, separators = [], [], [], []
    for row_cells in grid:
        for name, row, column in row_cells:
            start = column * per_column
            stop = min(start + per_column, num_samples)
            x_mm = left_mm + column * segment_mm
            traces.append(Trace(name, LEADS.index(name), start, stop, x_mm, baseline(row)))
            labels.append(Text(name, x_mm + (1.0 if page == "tight" else 0.0),
                               baseline(row) + label_dy))
            if column < columns - 1 and page == "letter":
                half = 3.15
                separators.append((x_mm + segment_mm, baseline(row) - half, baseline(row) + half))
        if pulses_on:
            pulses.append((gap_mm, baseline(row_cells[0][1]), pulse_mm))
    if format == "3x4":
        traces.append(Trace(RHYTHM_LEAD, LEADS.index(RHYTHM_LEAD), 0, num_samples, left_mm,
                            rhythm_baseline))
        labels.append(Text(RHYTHM_LEAD, left_mm + (1.0 if page == "tight" else 0.0),
                           rhythm_baseline + (0.8 * GAIN_MM_MV if page == "letter" else -8.0)))
        if pulses_on:
            pulses.append((gap_mm, rhythm_baseline, pulse_mm))
    notes = []
    if page == "letter":
        notes += [Text("25mm/s", 2.0 * PAPER_SPEED_MM_S, height_mm - 0.5 * GAIN_MM_MV),
                  Text("10mm/mV", 4.0 * PAPER_SPEED_MM_S, height_mm - 0.5 * GAIN_MM_MV)]
    if title:
        notes.append(Text(title, width_mm / 2, 3.0, centred=True))
    return PaperLayout(width_mm, height_mm, float(sample_rate), tuple(traces), tuple(labels),
                       tuple(pulses), tuple(separators), tuple(notes), style)
