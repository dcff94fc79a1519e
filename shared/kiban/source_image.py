"""One source image, read and checked against its ingest sha256, then decoded for a model.

The encoder's reader and the trainer both feed models from batch sources; this is the one
place that fetches the bytes, checks them and turns every failure into a recorded reason.
"""

from __future__ import annotations

import hashlib

import numpy as np

from kiban.imaging import ImageRejected, decode_for_model
from kiban.models.card import Preprocessing
from kiban.store import ObjectStore


def load_for_model(
    source: ObjectStore,
    key: str,
    sha256: str,
    prep: Preprocessing,
    max_pixels: int,
    min_side: int,
    *,
    draft: bool = True,
) -> np.ndarray | str:
    """uint8 HxWx3 crop of ``key``, or the reason it cannot be used.

    ``draft``: decode a large JPEG at reduced DCT scale (``decode_for_model``); False
    gives the full decode, ``preprocess(decode_image(data), prep)``.
    """
    try:
        data = source.get(key)
    except Exception as exc:  # noqa: BLE001 - any store error becomes a recorded failure
        return f"cannot read from source: {exc}"
    if hashlib.sha256(data).hexdigest() != sha256:
        return "source object changed since ingest (sha256 mismatch)"
    try:
        return decode_for_model(data, prep, max_pixels, min_side, draft=draft)
    except ImageRejected as exc:
        return exc.reason
