"""Decoding and preprocessing shared by ingest (validation), encoder and export (parity).

One implementation on purpose: the pixels the exporter checks parity on are produced by
the same code that feeds the encoder in production.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from kiban.models.card import Preprocessing

SUPPORTED_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class ImageRejected(Exception):
    """The bytes are not a usable image; ``reason`` is recorded in the quarantine list."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = 80_000_000, min_side: int = 8) -> Image.Image:
    """Fully decode ``data`` into an RGB image with EXIF orientation applied.

    Raises ImageRejected with a human-readable reason for anything unusable: empty or
    truncated files, non-images, decompression bombs, tiny images. Grey, CMYK, 16-bit
    and alpha images are converted to 8-bit RGB.
    """
    raise NotImplementedError  # implemented by the ingest work


def preprocess(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize the shorter side, centre-crop, return uint8 HxWx3 (the graph normalises)."""
    width, height = image.size
    scale = prep.resize_shorter / min(width, height)
    new_w = max(prep.crop, round(width * scale))
    new_h = max(prep.crop, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _RESAMPLE[prep.interpolation])
    left = (new_w - prep.crop) // 2
    top = (new_h - prep.crop) // 2
    image = image.crop((left, top, left + prep.crop, top + prep.crop))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {array.shape}")
    return array
