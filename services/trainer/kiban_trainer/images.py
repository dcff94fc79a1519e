"""Read training images from their batch sources, decoded and preprocessed once.

The pixels are read as the encoder reads them (``kiban.source_image.load_for_model``: the
source bytes, sha256 checked against the record, the same size limits, the model card's
preprocessing: shorter-side resize, centre crop, uint8 HxWx3), always at full decode (the
encoder's reduced-size JPEG draft is not used for training). Decoding runs in a thread pool
(Pillow releases the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kiban.context import Context
from kiban.models.card import Preprocessing
from kiban.records import read_batch_info
from kiban.source_image import load_for_model
from kiban.store import ObjectStore
from kiban_trainer.selection import TrainingImage


@dataclass
class Pixels:
    """uint8 [N, S, S, 3] crops aligned with ``images``; ``failures`` are (key, reason)."""

    array: np.ndarray
    images: list[TrainingImage]
    failures: list[tuple[str, str]] = field(default_factory=list)


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
            lambda item: load_for_model(
                sources[item.batch_id],
                item.key,
                item.sha256,
                prep,
                s.max_image_pixels,
                s.min_image_side,
                draft=False,  # training takes the full decode, not the encoder's JPEG draft
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
