"""Read training images from their batch sources, decoded and preprocessed once.

The pixels are exactly what the encoder feeds its ONNX session: the source bytes (sha256
checked against the record), ``kiban.imaging.decode_image`` with the same size limits, then
``kiban.imaging.preprocess`` with the model card's preprocessing (shorter-side resize, centre
crop, uint8 HxWx3). Decoding runs in a thread pool (Pillow releases the GIL).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kiban.context import Context
from kiban.imaging import ImageRejected, decode_image, preprocess
from kiban.models.card import Preprocessing
from kiban.records import read_batch_info
from kiban.store import ObjectStore
from kiban_trainer.selection import TrainingImage


@dataclass
class Pixels:
    """uint8 [N, S, S, 3] crops aligned with ``images``; ``failures`` are (key, reason)."""

    array: np.ndarray
    images: list[TrainingImage]
    failures: list[tuple[str, str]] = field(default_factory=list)


def _load(
    source: ObjectStore, item: TrainingImage, prep: Preprocessing, max_pixels: int, min_side: int
) -> np.ndarray | str:
    try:
        data = source.get(item.key)
    except Exception as exc:  # noqa: BLE001 - any store error is a recorded failure
        return f"cannot read from source: {exc}"
    if hashlib.sha256(data).hexdigest() != item.sha256:
        return "source object changed since ingest (sha256 mismatch)"
    try:
        return preprocess(decode_image(data, max_pixels, min_side), prep)
    except ImageRejected as exc:
        return exc.reason


def load_pixels(ctx: Context, items: Sequence[TrainingImage], prep: Preprocessing) -> Pixels:
    """Decode and preprocess ``items`` once; images that cannot be read are left out."""
    s = ctx.settings
    sources: dict[str, ObjectStore] = {}
    for batch_id in dict.fromkeys(i.batch_id for i in items):
        sources[batch_id] = ctx.open_source(read_batch_info(ctx.store, batch_id).source)
    crops = np.empty((len(items), prep.crop, prep.crop, 3), dtype=np.uint8)
    kept: list[TrainingImage] = []
    failures: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, s.decode_workers)) as pool:
        results = pool.map(
            lambda item: _load(
                sources[item.batch_id], item, prep, s.max_image_pixels, s.min_image_side
            ),
            items,
        )
        for item, result in zip(items, results, strict=True):
            if isinstance(result, str):
                failures.append((f"{item.batch_id}/{item.key}", result))
                continue
            crops[len(kept)] = result
            kept.append(item)
    return Pixels(array=crops[: len(kept)], images=kept, failures=failures)
