"""Stage-1 batches for a model with an image tower: each example's ECG image, rendered from its signal.

GEM's pipeline shows the model every ECG twice, as a signal and as the printed page. A batch of the
stage-1 loader (`ecg` [B, 12, T] in the encoder's lead order) gains `image` [B, S, S, 3] (CLIP
pixels of `data.ecg_image.render_ecg_image`'s page) and `ecg_present` / `image_present` [B] (1:
both inputs; modality dropout in `train.stage1` hides one of them per step). With distortions the
print artefacts are seeded per example by its record key, so an example's image is the same in
every epoch and on every host; the pixels are therefore memoised per (record key, signal bytes)
up to `CACHE_BYTES`, and a small dataset renders each page once, not once per step.

The page is rendered at GEM's page-to-tower oversampling (`render_dpi`): ecg-image-kit's 200 dpi
page (1700 px short edge) for CLIP's 336 px, proportionally fewer dots for a smaller tower (at
least 50 dpi); the tower sees the page resized to its input size either way.
"""
from __future__ import annotations

import collections
import math
import zlib
from typing import Iterable, Iterator

import numpy as np

from uniecg_jax.data.ecg_image import DEFAULT_DPI, PrintDistortions, render_ecg_image
from uniecg_jax.data.image_preprocess import clip_preprocess
from uniecg_jax.data.record import ENCODER_FS, to_canonical_lead_order


CLIP_336_DPI = 336          # the tower size GEM renders ecg-image-kit's 200 dpi pages for
MIN_DPI = 50
CACHE_BYTES = 256 << 20     # memoised pixels per loader


def render_dpi(image_size: int) -> float:
    """Page resolution for a tower of `image_size` px: 200 dpi at 336 px (GEM), proportional
    below, at least `MIN_DPI`."""
    return float(min(DEFAULT_DPI, max(MIN_DPI, math.ceil(DEFAULT_DPI * image_size
                                                          / CLIP_336_DPI))))


def ecg_pixels(ecg: np.ndarray, image_size: int, aspect: str, lead_order: str = "canonical",
               distortions: PrintDistortions | None = None, seed: int = 0) -> np.ndarray:
    """One ECG [12, T] mV (encoder lead order) -> CLIP pixels float32 [image_size, image_size, 3]
    of its printed page (at `render_dpi(image_size)`)."""
    page = render_ecg_image(to_canonical_lead_order(np.asarray(ecg), lead_order), ENCODER_FS,
                            dpi=render_dpi(image_size), distortions=distortions, seed=seed)
    return clip_preprocess(page, image_size, aspect)


def example_seed(record_key, index: int, base_seed: int) -> int:
    """The distortion seed of one example: its record key's CRC (the batch index without one)."""
    key = record_key if record_key is not None else str(index)
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    return zlib.crc32(f"{base_seed}:{key}".encode()) & 0x7FFFFFFF


class RenderedImageBatches:
    """Stage-1 batches -> the same batches with `image`, `ecg_present`, `image_present` added.

    Passes the wrapped loader's `get_state` / `set_state` through, so it checkpoints (and resumes)
    as the grain iterator does (the train loop saves the data iterator beside the state)."""

    def __init__(self, batches: Iterable[dict], image_size: int, aspect: str,
                 lead_order: str = "canonical", distortions: bool = False, seed: int = 0):
        self.batches = iter(batches)
        self.image_size, self.aspect, self.lead_order, self.seed = image_size, aspect, \
            lead_order, seed
        self.distortions = PrintDistortions() if distortions else None
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def _pixels(self, ecg: np.ndarray, key, index: int) -> np.ndarray:
        seed = example_seed(key, index, self.seed)
        if key is None:     # without a record key the seed follows the batch position
            return ecg_pixels(ecg, self.image_size, self.aspect, self.lead_order,
                              self.distortions, seed)
        ecg = np.ascontiguousarray(ecg)
        memo = (key, ecg.shape, str(ecg.dtype), zlib.crc32(ecg.tobytes()))
        if memo in self._cache:
            self._cache.move_to_end(memo)
            return self._cache[memo]
        pixels = ecg_pixels(ecg, self.image_size, self.aspect, self.lead_order,
                            self.distortions, seed).astype(np.float32)
        self._cache[memo] = pixels
        while len(self._cache) * pixels.nbytes > CACHE_BYTES:
            self._cache.popitem(last=False)
        return pixels

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        keys = batch.get("record_key")
        ecgs = np.asarray(batch["ecg"])
        images = np.stack([self._pixels(ecg, None if keys is None else keys[index], index)
                           for index, ecg in enumerate(ecgs)])
        ones = np.ones((ecgs.shape[0],), np.int32)
        return dict(batch, image=images.astype(np.float32), ecg_present=ones,
                    image_present=ones.copy())

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)


def with_rendered_images(batches: Iterable[dict], image_size: int, aspect: str,
                         lead_order: str = "canonical", distortions: bool = False,
                         seed: int = 0) -> RenderedImageBatches:
    """Stage-1 batches -> the same batches with `image`, `ecg_present`, `image_present` added
    (`RenderedImageBatches`)."""
    return RenderedImageBatches(batches, image_size, aspect, lead_order, distortions, seed)
