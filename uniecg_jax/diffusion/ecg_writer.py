"""Generated ECGs to disk: WFDB records (`.hea` + `.dat`, 12 named leads in mV) and 12-lead PNGs on
standard paper (25 mm/s, 10 mm/mV, 1 mm / 5 mm grid; 3 x 4 layout of 2.5 s + a lead II rhythm strip).
The page geometry is `data.ecg_paper`'s (shared with the image renderer `data.ecg_image`).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import wfdb

from uniecg_jax.data.ecg_paper import MM_PER_INCH, checked_twelve_leads, paper_layout, pulse_points
from uniecg_jax.data.record import LEADS


_check = checked_twelve_leads


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


def plot_ecg_paper(ecg: np.ndarray, sample_rate: float, path: str, title: str | None = None,
                   format: str = "3x4", page: str = "tight") -> str:
    """12-lead PNG at paper scale, drawn from `data.ecg_paper.paper_layout` (default: 3 rows x 4
    columns of 2.5 s plus a 10 s lead II strip on a page fitted to the traces).

    One millimetre of paper is one millimetre of figure (dpi fixed at 100), so 25 mm/s and
    10 mm/mV hold when the image is shown at its physical size.
    """
    import matplotlib  # heavy (~1 s), needed only to draw a figure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ecg = _check(ecg, path)
    layout = paper_layout(ecg.shape[1], sample_rate, format=format, page=page, title=title)
    style = layout.style
    fig = plt.figure(figsize=(layout.width_mm / MM_PER_INCH, layout.height_mm / MM_PER_INCH),
                     dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, layout.width_mm)
    ax.set_ylim(layout.height_mm, 0)     # the layout's y runs downwards
    minor, major = (np.asarray(style.grid_minor_rgb) / 255, np.asarray(style.grid_major_rgb) / 255)
    xs, ys = layout.grid_lines()
    for lines, draw in ((xs, ax.axvline), (ys, ax.axhline)):
        for position, is_major in lines:
            draw(position, color=major if is_major else minor,
                 lw=style.grid_major_pt if is_major else style.grid_minor_pt)
    for trace in layout.traces:
        ax.plot(*layout.trace_points(trace, ecg), color="black", lw=style.trace_pt)
    for x_mm, baseline_mm, width_mm in layout.pulses:
        ax.plot(*pulse_points(x_mm, baseline_mm, width_mm, layout.mm_per_sample), color="black",
                lw=style.pulse_pt)
    for x_mm, y0_mm, y1_mm in layout.separators:
        ax.plot((x_mm, x_mm), (y0_mm, y1_mm), color="black", lw=style.separator_pt)
    for text in layout.labels + layout.notes:
        ax.text(text.x_mm, text.y_mm, text.text, fontsize=style.font_pt,
                ha="center" if text.centred else "left", va="baseline")
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
