"""CLIP image preprocessing, as LLaVA / GEM feed their CLIP tower: an RGB image (a rendered ECG, a
scan or a photo of a printout) -> CLIP-normalised pixels `[S, S, 3]` float32, channels last.

The steps and their arithmetic are transformers' `CLIPImageProcessor` (the PIL backend,
`CLIPImageProcessorPil` in transformers 5; the only one in transformers 4, which LLaVA runs):
  resize  shortest edge -> S with PIL bicubic, the long edge int(S * long / short) (truncated)
  crop    centre S x S: top = (h - S) // 2, left = (w - S) // 2 (zero padding if smaller)
  rescale uint8 * (1 / 255) in float64, then float32
  normalise (x - mean) / std in float32 with OpenAI's CLIP mean / std
Aspect handling (LLaVA's `image_aspect_ratio`, llava/mm_utils.py `process_images`, and GEM's
llava/train/train.py `__getitem__`): `ori` (GEM's, = LLaVA's default) applies the processor to the
image as it is; `pad` first expands it to a square of colour `int(mean * 255)` per channel
(122, 116, 104), the image pasted at ((side - w) // 2, (side - h) // 2) (`expand2square`).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from uniecg_jax.errors import RecordError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)     # transformers OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)      # transformers OPENAI_CLIP_STD
ASPECT_MODES = ("ori", "pad")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file (PNG, JPEG, ...) -> RGB uint8 `[H, W, 3]`; RecordError naming the file if it
    cannot be read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RecordError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise RecordError(f"{path}: cannot read the image: {e}") from None


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if (image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3
            or min(image.shape[:2]) < 1):
        raise RecordError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} "
                          f"{tuple(image.shape)}")
    return image


def expand_to_square(image: np.ndarray, mean: tuple[float, ...] = CLIP_MEAN) -> np.ndarray:
    """LLaVA's `expand2square`: `[H, W, 3]` uint8 -> `[side, side, 3]`, side = max(H, W), the image
    centred on a background of colour `int(m * 255)` per channel."""
    image = _check_rgb(image)
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    background = np.array([int(m * 255) for m in mean], np.uint8)
    square = np.broadcast_to(background, (side, side, 3)).copy()
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = image
    return square


def resize_shortest_edge(image: np.ndarray, size: int) -> np.ndarray:
    """`[H, W, 3]` uint8 -> the shortest edge `size` (PIL bicubic), long edge truncated."""
    image = _check_rgb(image)
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_height, new_width = (new_long, size) if width <= height else (size, new_long)
    resized = Image.fromarray(image).resize((new_width, new_height),
                                            resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre `size` x `size` crop of `[H, W, C]`, zero-padded (centred) where the image is
    smaller (transformers' `center_crop`)."""
    height, width = image.shape[:2]
    if height < size or width < size:
        pad_top, pad_left = -(-max(size - height, 0) // 2), -(-max(size - width, 0) // 2)
        padded = np.zeros((max(height, size), max(width, size)) + image.shape[2:], image.dtype)
        padded[pad_top:pad_top + height, pad_left:pad_left + width] = image
        top = (height - size) // 2 + pad_top
        left = (width - size) // 2 + pad_left
        image = padded
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


def clip_preprocess(image: np.ndarray, image_size: int = 336, aspect: str = "ori",
                    mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
                    ) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` -> CLIP pixels float32 `[image_size, image_size, 3]` (module
    docstring); `aspect` is `ori` or `pad`."""
    if aspect not in ASPECT_MODES:
        raise RecordError(f"image aspect mode {aspect!r}: choose from {ASPECT_MODES}")
    image = _check_rgb(image)
    if aspect == "pad":
        image = expand_to_square(image, mean)
    image = center_crop(resize_shortest_edge(image, image_size), image_size)
    scaled = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_preprocess_batch(images: list[np.ndarray], image_size: int = 336, aspect: str = "ori"
                          ) -> np.ndarray:
    """`clip_preprocess` of each image, stacked: float32 `[B, image_size, image_size, 3]`."""
    return np.stack([clip_preprocess(image, image_size, aspect) for image in images])
