"""Stage-1 batches for a model with an image tower: each example's ECG image, rendered from its signal.

GEM's pipeline shows the model every ECG twice, as a signal and as the printed page. A batch of the
stage-1 loader (`ecg` [B, 12, T] in the encoder's lead order) gains `image` [B, S, S, 3] (CLIP
pixels of `data.ecg_image.render_ecg_image`'s page) and `ecg_present` / `image_present` [B] (1:
both inputs; modality dropout in `train.stage1` hides one of them per step). With distortions the
print artefacts are seeded per example by its record key, so an example's image is the same in
every epoch and on every host.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Iterator

import numpy as np

from uniecg_jax.data.ecg_image import PrintDistortions, render_ecg_image
from uniecg_jax.data.image_preprocess import clip_preprocess
from uniecg_jax.data.record import ENCODER_FS, to_canonical_lead_order


def ecg_pixels(ecg: np.ndarray, image_size: int, aspect: str, lead_order: str = "canonical",
               distortions: PrintDistortions | None = None, seed: int = 0) -> np.ndarray:
    """One ECG [12, T] mV (encoder lead order) -> CLIP pixels float32 [image_size, image_size, 3]
    of its printed page."""
    page = render_ecg_image(to_canonical_lead_order(np.asarray(ecg), lead_order), ENCODER_FS,
                            distortions=distortions, seed=seed)
    return clip_preprocess(page, image_size, aspect)


def example_seed(record_key, index: int, base_seed: int) -> int:
    """The distortion seed of one example: its record key's CRC (the batch index without one)."""
    key = record_key if record_key is not None else str(index)
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    return zlib.crc32(f"{base_seed}:{key}".encode()) & 0x7FFFFFFF


def with_rendered_images(batches: Iterable[dict], image_size: int, aspect: str,
                         lead_order: str = "canonical", distortions: bool = False,
                         seed: int = 0) -> Iterator[dict]:
    """Stage-1 batches -> the same batches with `image`, `ecg_present`, `image_present` added."""
    config = PrintDistortions() if distortions else None
    for batch in batches:
        keys = batch.get("record_key")
        ecgs = np.asarray(batch["ecg"])
        images = np.stack([
            ecg_pixels(ecg, image_size, aspect, lead_order, config,
                       example_seed(None if keys is None else keys[index], index, seed))
            for index, ecg in enumerate(ecgs)])
        ones = np.ones((ecgs.shape[0],), np.int32)
        yield dict(batch, image=images.astype(np.float32), ecg_present=ones,
                   image_present=ones.copy())
