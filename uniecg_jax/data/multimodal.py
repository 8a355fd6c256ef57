"""Stage-1 batches for a model with an image tower: each example's ECG image, rendered from its signal.

GEM's pipeline shows the model every ECG twice, as a signal and as the printed page. A batch of the
stage-1 loader (`ecg` [B, 12, T] in the encoder's lead order) gains `image` [B, S, S, 3] (CLIP
pixels of `data.ecg_image.render_ecg_image`'s page) and `ecg_present` / `image_present` [B] (1:
both inputs; modality dropout in `train.stage1` hides one of them per step). With distortions the
print artefacts are seeded per example by its record key, so an example's image is the same in
every epoch and on every host.

The page is rendered at GEM's page-to-tower oversampling (`render_dpi`): ecg-image-kit's 200 dpi
page (1700 px short edge) for CLIP's 336 px, proportionally fewer dots for a smaller tower (at
least 50 dpi; distortions at 200 dpi cost ~40x those at 50); the tower sees the page resized to its
input size either way.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import math
import zlib
from typing import Iterable

import numpy as np

from uniecg_jax.data.ecg_image import DEFAULT_DPI, PrintDistortions, render_ecg_image
from uniecg_jax.data.image_preprocess import clip_preprocess
from uniecg_jax.data.pipelines import MappedBatches
from uniecg_jax.data.record import ENCODER_FS, to_canonical_lead_order


CLIP_336_SIZE = 336         # the tower size GEM renders ecg-image-kit's 200 dpi pages for
MIN_DPI = 50


def render_dpi(image_size: int) -> float:
    """Page resolution for a tower of `image_size` px: 200 dpi at 336 px (GEM), proportional
    below, at least `MIN_DPI`."""
    return float(min(DEFAULT_DPI, max(MIN_DPI, math.ceil(DEFAULT_DPI * image_size
                                                          / CLIP_336_SIZE))))


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


class RenderedImages(MappedBatches):
    """Stage-1 batches -> the same batches with `image`, `ecg_present`, `image_present` added.

    An example's page is a pure function of its signal and seed, and the same in every epoch, so
    pages are memoised (up to `cache_size` of them: a printed page with distortions takes seconds
    to render, ~30x a tiny model's step on the bundled data). `get_state` / `set_state` are the
    wrapped grain iterator's (`data.pipelines.MappedBatches`), so a training checkpoint holds the
    data position as without images.
    """

    def __init__(self, batches: Iterable[dict], image_size: int, aspect: str,
                 lead_order: str = "canonical", distortions: bool = False, seed: int = 0,
                 cache_size: int = 4096):
        super().__init__(iter(batches))
        self._render = functools.partial(ecg_pixels, image_size=image_size, aspect=aspect,
                                         lead_order=lead_order,
                                         distortions=PrintDistortions() if distortions else None)
        self._seed, self._cache_size = seed, cache_size
        self._cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()

    def _pixels(self, ecg: np.ndarray, seed: int) -> np.ndarray:
        key = hashlib.sha1(np.ascontiguousarray(ecg, np.float32).tobytes()
                           + seed.to_bytes(8, "little")).digest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pixels = self._render(ecg, seed=seed).astype(np.float32)
        self._cache[key] = pixels
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pixels

    def transform(self, batch: dict) -> dict:
        keys = batch.get("record_key")
        ecgs = np.asarray(batch["ecg"])
        images = np.stack([
            self._pixels(ecg, example_seed(None if keys is None else keys[index], index,
                                           self._seed))
            for index, ecg in enumerate(ecgs)])
        ones = np.ones((ecgs.shape[0],), np.int32)
        return dict(batch, image=images, ecg_present=ones, image_present=ones.copy())


def with_rendered_images(batches: Iterable[dict], image_size: int, aspect: str,
                         lead_order: str = "canonical", distortions: bool = False,
                         seed: int = 0) -> RenderedImages:
    """Stage-1 batches -> the same batches with `image`, `ecg_present`, `image_present` added
    (`RenderedImages`)."""
    return RenderedImages(batches, image_size, aspect, lead_order, distortions, seed)
