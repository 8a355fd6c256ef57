"""12-lead ECG images rendered from signals, as GEM's image tower saw them: the page of
`data.ecg_paper` (default: ecg-image-kit's letter page, 3 x 4 grid of 2.5 s + a 10 s lead II rhythm
strip, 25 mm/s, 10 mm/mV, red grid, lead names) rasterised with numpy, without matplotlib.

    image = render_ecg_image(ecg, 500.0)                       # uint8 [1700, 2200, 3] at 200 dpi
    image = render_ecg_image(ecg, 500.0, dpi=100, distortions=PrintDistortions(), seed=index)

Deterministic: the same inputs (and seed) give the same bytes. Fast enough for the data pipeline:
the grid page is drawn once per (page, dpi) and cached; a trace is rasterised column by column (each
pixel column is covered between the lowest and highest point the polyline reaches inside it, widened
by the line width, with fractional coverage at both ends), which is exact for traces denser than the
pixels and costs O(width x trace height). Lead names are PIL's bundled FreeType font (Pillow
>= 10.1: the same glyphs on every machine), drawn once per (text, size) and cached.

Print-like distortions (`PrintDistortions`, seeded per example): a paper shadow (smooth
multiplicative illumination), fold creases (bright bands, as ecg-image-kit's CreasesWrinkles),
rotation, Gaussian blur, additive Gaussian noise, a small crop and a colour-temperature shift (as
ecg-image-kit's ImageAugmentation: rotation, noise, crop, temperature), and a grey trace colour.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from uniecg_jax.data.ecg_paper import (MM_PER_INCH, MM_PER_POINT, PaperLayout, PaperStyle,
                                       checked_twelve_leads, paper_layout, pulse_points)

DEFAULT_DPI = 200           # ecg-image-kit's `--resolution` default
WHITE = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class PrintDistortions:
    """Ranges of the per-example distortions (each drawn uniformly from its range with the seed).

    rotation_deg: +- degrees; blur_sigma_px / noise_std: upper bounds (noise on the 0-255 scale);
    crop_fraction: up to this fraction cut from each edge, then resized back; temperature: up to
    this relative red/blue gain change; crease_probability / max_creases: fold lines across the
    page;
    shadow_probability / shadow_strength: a linear illumination falloff darkening up to this
    fraction; trace_grey: the trace colour is grey in [0, trace_grey] (ecg-image-kit: 0.2).
    """
    rotation_deg: float = 3.0
    blur_sigma_px: float = 1.2
    noise_std: float = 10.0
    crop_fraction: float = 0.01
    temperature: float = 0.08
    crease_probability: float = 0.5
    max_creases: int = 3
    shadow_probability: float = 0.5
    shadow_strength: float = 0.35
    trace_grey: float = 0.2


def _line_profile(length_px: int, centres_px: np.ndarray, width_px: float) -> np.ndarray:
    """Coverage [length_px] in [0, 1] of lines of `width_px` centred at `centres_px` along one axis
    (pixel j spans [j, j + 1)); overlapping lines saturate at 1."""
    coverage = np.zeros(length_px, np.float64)
    half = max(width_px, 1e-3) / 2
    for centre in centres_px:
        lo, hi = centre - half, centre + half
        first, last = max(int(np.floor(lo)), 0), min(int(np.floor(hi)), length_px - 1)
        for j in range(first, last + 1):
            coverage[j] += max(0.0, min(j + 1.0, hi) - max(float(j), lo))
    return np.minimum(coverage, 1.0)


@functools.lru_cache(maxsize=8)
def _grid_page(style: PaperStyle, width_mm: float, height_mm: float, dpi: float) -> np.ndarray:
    """The empty grid page as uint8 [H, W, 3] (read-only, cached per page and dpi)."""
    scale = dpi / MM_PER_INCH
    width_px, height_px = int(round(width_mm * scale)), int(round(height_mm * scale))
    layout = PaperLayout(width_mm, height_mm, 1.0, (), (), (), (), (), style)
    xs, ys = layout.grid_lines()
    page = np.broadcast_to(np.asarray(WHITE, np.float32), (height_px, width_px, 3)).copy()
    for is_major, rgb, points in ((False, style.grid_minor_rgb, style.grid_minor_pt),
                                  (True, style.grid_major_rgb, style.grid_major_pt)):
        width_px_line = points * MM_PER_POINT * scale
        cover_x = _line_profile(width_px, np.array([p for p, m in xs if m == is_major]) * scale,
                                width_px_line)
        cover_y = _line_profile(height_px, np.array([p for p, m in ys if m == is_major]) * scale,
                                width_px_line)
        alpha = 1.0 - (1.0 - cover_y[:, None]) * (1.0 - cover_x[None, :])
        page += (np.asarray(rgb, np.float32) - page) * alpha[..., None].astype(np.float32)
    page = np.round(page).astype(np.uint8)
    page.flags.writeable = False
    return page


def _composite(image: np.ndarray, top: int, left: int, alpha: np.ndarray, rgb) -> None:
    """Blends colour `rgb` into `image` [H, W, 3] (uint8, in place) with `alpha` [h, w] placed at
    (top, left); parts outside the image are dropped. Only the covered box is touched."""
    height, width = image.shape[:2]
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + alpha.shape[0], height), min(left + alpha.shape[1], width)
    if t1 <= t0 or l1 <= l0:
        return
    a = alpha[t0 - top:t1 - top, l0 - left:l1 - left, None].astype(np.float32)
    region = image[t0:t1, l0:l1].astype(np.float32)
    region += (np.asarray(rgb, np.float32) - region) * a
    image[t0:t1, l0:l1] = np.round(region).astype(np.uint8)


def _polyline_alpha(xs_px: np.ndarray, ys_px: np.ndarray, width_px: float
                    ) -> tuple[int, int, np.ndarray]:
    """Coverage of a polyline (x increasing) of `width_px`: (top, left, alpha [h, w]).

    Per pixel column [j, j + 1): the polyline's lowest and highest y inside it (the interpolated
    values at both column edges and every vertex within), widened by half the line width; rows are
    covered by their overlap with that span.
    """
    left = int(np.floor(xs_px[0]))
    right = int(np.floor(xs_px[-1])) + 1
    edges = np.arange(left, right + 1, dtype=np.float64)
    at_edges = np.interp(edges, xs_px, ys_px)
    low = np.minimum(at_edges[:-1], at_edges[1:])
    high = np.maximum(at_edges[:-1], at_edges[1:])
    column = np.clip(np.floor(xs_px).astype(np.int64) - left, 0, right - left - 1)
    np.minimum.at(low, column, ys_px)
    np.maximum.at(high, column, ys_px)
    half = width_px / 2
    low, high = low - half, high + half
    top = int(np.floor(low.min()))
    bottom = int(np.floor(high.max())) + 1
    rows = np.arange(top, bottom, dtype=np.float64)[:, None]
    alpha = np.clip(np.minimum(rows + 1.0, high[None, :]) - np.maximum(rows, low[None, :]), 0, 1)
    return top, left, alpha


@functools.lru_cache(maxsize=256)
def _text_mask(text: str, size_px: int) -> tuple[int, int, np.ndarray]:
    """(dx, dy, alpha [h, w]) of `text` in PIL's bundled font at `size_px`; (dx, dy) is the mask's
    top-left corner relative to the text's left baseline point."""
    font = ImageFont.load_default(size=size_px)
    left, top, right, bottom = font.getbbox(text, anchor="ls")
    canvas = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, font=font, fill=255, anchor="ls")
    mask = np.asarray(canvas, np.float32) / 255.0
    mask.flags.writeable = False
    return left, top, mask


def draw_layout(layout: PaperLayout, ecg: np.ndarray, dpi: float = DEFAULT_DPI,
                trace_rgb: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Rasterises `layout` with the traces of `ecg` `[12, T]` (mV): uint8 [H, W, 3]."""
    scale = dpi / MM_PER_INCH
    style = layout.style
    image = _grid_page(style, layout.width_mm, layout.height_mm, float(dpi)).copy()
    for trace in layout.traces:
        xs, ys = layout.trace_points(trace, ecg)
        _composite(image, *_polyline_alpha(xs * scale, ys * scale,
                                           style.trace_pt * MM_PER_POINT * scale), trace_rgb)
    for x_mm, baseline_mm, width_mm in layout.pulses:
        xs, ys = pulse_points(x_mm, baseline_mm, width_mm, layout.mm_per_sample)
        _composite(image, *_polyline_alpha(np.asarray(xs) * scale, np.asarray(ys) * scale,
                                           style.pulse_pt * MM_PER_POINT * scale), trace_rgb)
    for x_mm, y0_mm, y1_mm in layout.separators:
        half = style.separator_pt * MM_PER_POINT * scale / 2
        left = int(np.floor(x_mm * scale - half))
        columns = int(np.floor(x_mm * scale + half)) - left + 1
        alpha_x = _line_profile(columns, np.array([x_mm * scale - left]), 2 * half)
        rows = int(round((y1_mm - y0_mm) * scale))
        _composite(image, int(round(y0_mm * scale)), left,
                   np.broadcast_to(alpha_x[None, :], (rows, columns)), trace_rgb)
    size_px = max(int(round(style.font_pt * MM_PER_POINT * scale)), 6)
    for text in layout.labels + layout.notes:
        dx, dy, mask = _text_mask(text.text, size_px)
        x_px = text.x_mm * scale - (mask.shape[1] / 2 if text.centred else 0)
        _composite(image, int(round(text.y_mm * scale)) + dy, int(round(x_px)) + dx, mask,
                   trace_rgb)
    return image


def _gain_field(rng: np.random.Generator, height: int, width: int,
                config: PrintDistortions) -> np.ndarray:
    """Multiplicative illumination [H, W] of a paper shadow and fold creases (1 = unchanged).

    Both are smooth, so the field is computed at 1/4 resolution and upsampled bilinearly."""
    small_h, small_w = max(height // 4, 2), max(width // 4, 2)
    rows = np.linspace(0, height - 1, small_h, dtype=np.float32)[:, None]
    cols = np.linspace(0, width - 1, small_w, dtype=np.float32)[None, :]
    gain = np.ones((small_h, small_w), np.float32)
    if rng.random() < config.shadow_probability:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * cols / width + np.sin(angle) * rows / height
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        gain *= 1.0 - config.shadow_strength * rng.uniform(0.3, 1.0) * ramp
    if config.max_creases and rng.random() < config.crease_probability:
        band = max(width, height) * 0.004
        for _ in range(int(rng.integers(1, config.max_creases + 1))):
            # A fold through a random point at a random angle; ecg-image-kit draws a crease as
            # blurred lines of gain 1.25 / 1.15 / 1.05 at 0 / 5 / 10 px from the fold.
            theta = rng.uniform(0, np.pi)
            point_x, point_y = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
            distance = np.abs((cols - point_x) * np.sin(theta) - (rows - point_y) * np.cos(theta))
            gain *= 1.0 + 0.25 * np.exp(-0.5 * (distance / band) ** 2)
    return np.asarray(Image.fromarray(gain, mode="F").resize((width, height),
                                                            Image.Resampling.BILINEAR))


def distort(image: np.ndarray, seed: int, config: PrintDistortions = PrintDistortions()
            ) -> np.ndarray:
    """Print / scan / photo artefacts on a uint8 [H, W, 3] page, drawn from
    `np.random.default_rng(seed)`; returns uint8 [H, W, 3] of the same size.

    Geometry first, in one bilinear resampling (rotation about the centre composed with the crop
    zoomed back to full size), then the blur, then one float pass for the illumination (shadow,
    creases), the colour temperature and the sensor noise.
    """
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    picture = Image.fromarray(image)
    angle = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg))
    cut = rng.uniform(0, config.crop_fraction, size=4) * np.array([width, height] * 2)
    if angle or cut.any():
        scale_x = (width - cut[0] - cut[2]) / width
        scale_y = (height - cut[1] - cut[3]) / height
        cos, sin = np.cos(angle), np.sin(angle)
        centre_x, centre_y = width / 2, height / 2
        # Output pixel -> crop-box point -> rotated back about the centre (PIL maps out -> in).
        matrix = (cos * scale_x, sin * scale_y,
                  cos * (cut[0] - centre_x) + sin * (cut[1] - centre_y) + centre_x,
                  -sin * scale_x, cos * scale_y,
                  -sin * (cut[0] - centre_x) + cos * (cut[1] - centre_y) + centre_y)
        picture = picture.transform((width, height), Image.Transform.AFFINE, matrix,
                                    resample=Image.Resampling.BILINEAR, fillcolor=WHITE)
    sigma = rng.uniform(0, config.blur_sigma_px)
    if sigma > 0.05:
        picture = picture.filter(ImageFilter.GaussianBlur(sigma))
    gain = _gain_field(rng, height, width, config)
    channel_gains = 1.0 + config.temperature * rng.uniform(-1, 1) * np.array([1.0, 0.0, -1.0],
                                                                              np.float32)
    out = np.asarray(picture, np.float32) * (gain[..., None] * channel_gains)
    if config.noise_std:
        # Luminance noise (one draw per pixel, shared by the channels): a third of the cost of
        # per-channel noise, which dominated the distortion time.
        out += rng.uniform(0, config.noise_std) * rng.standard_normal((height, width, 1),
                                                                     np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_ecg_image(ecg: np.ndarray, sample_rate: float, *, format: str = "3x4",
                     page: str = "letter", dpi: float = DEFAULT_DPI,
                     distortions: PrintDistortions | None = None, seed: int = 0) -> np.ndarray:
    """A 12-lead ECG `[12, T]` in mV (leads in `LEADS` order) -> RGB uint8 `[H, W, 3]` of the
    printed page (letter at 200 dpi: 1700 x 2200). With `distortions`, print artefacts and a grey
    trace are drawn from `seed` (the same seed gives the same bytes).

    Raises RecordError for a wrong shape, NaN/Inf, or a record that does not fit the page.
    """
    ecg = checked_twelve_leads(ecg, "ECG image")
    layout = paper_layout(ecg.shape[1], sample_rate, format=format, page=page)
    if distortions is None:
        return draw_layout(layout, ecg, dpi)
    rng = np.random.default_rng([seed, 1])   # a stream of its own, apart from `distort`'s
    grey = int(round(255 * rng.uniform(0, distortions.trace_grey)))
    return distort(draw_layout(layout, ecg, dpi, (grey, grey, grey)), seed, distortions)
