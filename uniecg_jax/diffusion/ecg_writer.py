"""Generated ECGs to disk: WFDB records (`.hea` + `.dat`, 12 named leads in mV) and 12-lead PNGs on
standard paper (25 mm/s, 10 mm/mV, 1 mm / 5 mm grid; 3 x 4 layout of 2.5 s + a lead II rhythm strip).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import wfdb

from uniecg_jax.data.record import LEADS
from uniecg_jax.errors import RecordError

PAPER_SPEED_MM_S = 25.0
GAIN_MM_MV = 10.0


def _check(ecg: np.ndarray, what: str) -> np.ndarray:
    ecg = np.asarray(ecg, dtype=np.float64)
    if ecg.ndim != 2 or ecg.shape[0] != len(LEADS):
        raise RecordError(f"{what}: expected an ECG [12, T], got shape {ecg.shape}")
    if not np.all(np.isfinite(ecg)):
        raise RecordError(f"{what}: signal contains NaN or Inf")
    return ecg


def write_wfdb(ecg: np.ndarray, directory: str, record_name: str, sample_rate: float,
               comments: Sequence[str] = ()) -> str:
    """Writes `directory/record_name.{hea,dat}` (16-bit, units mV, leads I..V6); returns the path
    stem for `wfdb.rdrecord`. `ecg` is `[12, T]` in mV."""
    ecg = _check(ecg, f"{record_name}")
    os.makedirs(directory, exist_ok=True)
    wfdb.wrsamp(record_name, fs=float(sample_rate), units=["mV"] * len(LEADS),
                sig_name=list(LEADS), p_signal=ecg.T, fmt=["16"] * len(LEADS),
                comments=[str(c).replace("\n", " ") for c in comments], write_dir=directory)
    return os.path.join(directory, record_name)


def plot_ecg_paper(ecg: np.ndarray, sample_rate: float, path: str, title: str | None = None) -> str:
    """12-lead PNG at paper scale: 3 rows x 4 columns of 2.5 s each plus a 10 s lead II strip.

    One millimetre of paper is one millimetre of figure (dpi fixed at 100), so 25 mm/s and
    10 mm/mV hold when the image is shown at its physical size.
    """
    import matplotlib  # heavy (~1 s), needed only to draw a figure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ecg = _check(ecg, path)
    seconds = ecg.shape[1] / sample_rate
    segment = seconds / 4
    width_mm = seconds * PAPER_SPEED_MM_S
    row_mm = 30.0  # +-1.5 mV per row
    rows = 4
    height_mm = rows * row_mm
    fig = plt.figure(figsize=(width_mm / 25.4, height_mm / 25.4), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width_mm)
    ax.set_ylim(0, height_mm)
    for x in np.arange(0, width_mm + 1e-6, 1.0):
        ax.axvline(x, color="#f4c6c6" if round(x) % 5 else "#e08080", lw=0.3 if round(x) % 5 else 0.7)
    for y in np.arange(0, height_mm + 1e-6, 1.0):
        ax.axhline(y, color="#f4c6c6" if round(y) % 5 else "#e08080", lw=0.3 if round(y) % 5 else 0.7)
    times_mm = np.arange(ecg.shape[1]) / sample_rate * PAPER_SPEED_MM_S
    per_segment = int(round(segment * sample_rate))
    for index, name in enumerate(LEADS):
        row, column = index % 3, index // 3
        baseline = height_mm - (row + 0.5) * row_mm
        start = column * per_segment
        part = slice(start, min(start + per_segment, ecg.shape[1]))
        ax.plot(times_mm[part], baseline + ecg[index, part] * GAIN_MM_MV, color="black", lw=0.6)
        ax.text(times_mm[start] + 1, baseline + 8, name, fontsize=7)
    rhythm_baseline = row_mm * 0.5
    ax.plot(times_mm, rhythm_baseline + ecg[1] * GAIN_MM_MV, color="black", lw=0.6)
    ax.text(1, rhythm_baseline + 8, "II", fontsize=7)
    if title:
        ax.text(width_mm / 2, height_mm - 3, title, ha="center", fontsize=7)
    ax.axis("off")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def next_free_index(directory: str, prefix: str) -> int:
    """1 + the highest N of the `prefix_NNN.{hea,dat,png}` files in `directory` (0 when none), so
    that records written next never replace earlier ones."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d{{3,}})\.(?:hea|dat|png)$")
    indices = [int(match.group(1)) for name in (os.listdir(directory) if os.path.isdir(directory)
                                                else []) if (match := pattern.match(name))]
    return max(indices) + 1 if indices else 0


def write_generated(ecgs: np.ndarray, directory: str, sample_rate: float, prefix: str = "gen",
                    comments: Sequence[str] = (), png: bool = True, overwrite: bool = False
                    ) -> list[str]:
    """Writes every ECG of `ecgs` `[N, 12, T]` as `prefix_NNN.{hea,dat,png}`; returns the stems.

    Never replaces a record already there: numbering starts after the highest `prefix_NNN` in
    `directory` (a second request into the same folder adds records). `overwrite=True` numbers from
    000 and replaces what is there.
    """
    start = 0 if overwrite else next_free_index(directory, prefix)
    stems = []
    for i, ecg in enumerate(np.asarray(ecgs), start):
        name = f"{prefix}_{i:03d}"
        stems.append(write_wfdb(ecg, directory, name, sample_rate, comments))
        if png:
            plot_ecg_paper(ecg, sample_rate, os.path.join(directory, name + ".png"),
                           title="; ".join(comments) or None)
    return stems
