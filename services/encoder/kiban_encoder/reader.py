"""The reader stage: fetch and decode images in threads while the model runs.

Pillow and boto3 release the GIL, so a small thread pool keeps the inference session
fed without a second process. A JPEG much larger than the model input is decoded at a
reduced DCT scale (``kiban.source_image.load_for_model``), the main cost on
small CNNs. Results come back in record order, in batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kiban.models.card import Preprocessing
from kiban.records import ImageRecord
from kiban.source_image import load_for_model
from kiban.store import ObjectStore


@dataclass
class DecodedBatch:
    records: list[ImageRecord]
    pixels: np.ndarray  # uint8 [n, S, S, 3]
    failures: list[tuple[str, str]]  # (key, reason) of records that could not be used


def decoded_batches(
    source: ObjectStore,
    records: Sequence[ImageRecord],
    prep: Preprocessing,
    batch_size: int,
    workers: int,
    max_pixels: int,
    min_side: int,
) -> Iterator[DecodedBatch]:
    """Yield batches in record order, keeping at most ~2 batches of decodes in flight."""
    window = max(batch_size * 2, workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[ImageRecord, Future[np.ndarray | str]]] = deque()
        it = iter(records)

        def fill() -> None:
            while len(pending) < window:
                rec = next(it, None)
                if rec is None:
                    return
                fut = pool.submit(
                    load_for_model, source, rec.key, rec.sha256, prep, max_pixels, min_side
                )
                pending.append((rec, fut))

        fill()
        while pending:
            ok: list[ImageRecord] = []
            arrays: list[np.ndarray] = []
            failures: list[tuple[str, str]] = []
            while pending and len(ok) + len(failures) < batch_size:
                rec, fut = pending.popleft()
                result = fut.result()
                if isinstance(result, str):
                    failures.append((rec.key, result))
                else:
                    ok.append(rec)
                    arrays.append(result)
            fill()
            size = prep.crop
            pixels = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
            yield DecodedBatch(ok, pixels, failures)
