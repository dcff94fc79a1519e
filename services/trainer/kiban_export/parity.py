"""Parity: does the exported graph compute what the source model computes?

Both sides see the same uint8 crops, made by ``kiban.imaging.preprocess`` — the code the
encoder runs in production. The reference side normalises in numpy (so the in-graph
normalisation is checked too). The graph is run with batch 1 and with the whole batch,
which proves the batch axis is really dynamic and batching does not change results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kiban.imaging import preprocess
from kiban.models.card import ParityResult, Preprocessing
from kiban_export.errors import ExportError

# ONNX Runtime's telemetry starts when the library loads (a device ID and an event database
# under ~/.cache/Microsoft, a session file in $TMPDIR): off, before onnxruntime is imported.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

THRESHOLD_COSINE = 0.999
BATCH_CONSISTENCY_COSINE = 0.99999


@dataclass
class GraphRun:
    """Embeddings from the graph, batched and one-by-one."""

    batched: np.ndarray
    single: np.ndarray


def make_crops(images: Sequence[Image.Image], prep: Preprocessing, minimum: int = 3) -> np.ndarray:
    """uint8 [K, S, S, 3]; repeats images so at least ``minimum`` go in the batched run."""
    if not images:
        raise ExportError("parity needs at least one image")
    crops = [preprocess(img.convert("RGB"), prep) for img in images]
    while len(crops) < minimum:
        crops.append(crops[len(crops) % len(images)])
    return np.stack(crops)


def normalise(crops: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The numpy twin of the in-graph normalisation: float32 NHWC on the model's scale."""
    x = crops.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def ort_session(path: Path, threads: int = 0):  # noqa: ANN201 - onnxruntime is optional here
    """A CPU onnxruntime session (parity is about the graph, not the hardware)."""
    import onnxruntime as ort

    ort.disable_telemetry_events()  # nothing leaves the machine (a no-op where ORT has none)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load {path}: {exc}") from exc


def run_graph(path: Path, crops: np.ndarray, input_name: str = "images") -> GraphRun:
    """Run the exported graph batched and per image; raise if the batch axis is fixed."""
    session = ort_session(path)
    try:
        batched = session.run(None, {input_name: crops})[0]
    except Exception as exc:  # noqa: BLE001
        raise ExportError(
            f"exported graph fails on a batch of {len(crops)} (is the batch axis fixed?): {exc}"
        ) from exc
    single = np.concatenate(
        [session.run(None, {input_name: crops[i : i + 1]})[0] for i in range(len(crops))]
    )
    if batched.ndim != 2 or batched.shape[0] != len(crops):
        raise ExportError(f"exported graph returns shape {batched.shape}, expected [N, D]")
    if not (np.isfinite(batched).all() and np.isfinite(single).all()):
        raise ExportError("exported graph produces NaN/inf embeddings on the parity images")
    if batched.dtype != np.float32:
        raise ExportError(f"exported graph returns {batched.dtype}, expected float32")
    consistency = cosines(batched, single).min()
    if consistency < BATCH_CONSISTENCY_COSINE:
        raise ExportError(
            f"batched and one-by-one results differ (min cosine {consistency:.6f}): "
            "the graph is not batch-independent"
        )
    return GraphRun(batched=batched, single=single)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (zero vectors count as identical only to zero)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    dots = (a64 * b64).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dots / np.maximum(na * nb, 1e-300))
    return cos


def compare(graph: GraphRun, reference: np.ndarray, images: int, image_source: str) -> ParityResult:
    """Worst cosine and abs difference over both graph runs against the reference."""
    if reference.shape != graph.batched.shape:
        raise ExportError(
            f"graph output {graph.batched.shape} and reference {reference.shape} differ in shape"
        )
    if not np.isfinite(reference).all():
        raise ExportError("the source model produces NaN/inf embeddings on the parity images")
    cos = np.minimum(cosines(graph.batched, reference), cosines(graph.single, reference))
    diff = max(
        float(np.abs(graph.batched - reference).max()),
        float(np.abs(graph.single - reference).max()),
    )
    min_cos = float(cos.min())
    return ParityResult(
        images=images,
        image_source=image_source,
        min_cosine=min_cos,
        max_abs_diff=diff,
        passed=bool(min_cos >= THRESHOLD_COSINE),
        threshold_cosine=THRESHOLD_COSINE,
    )


def torch_reference(
    module_forward: Callable[[np.ndarray], np.ndarray], x_nhwc: np.ndarray
) -> np.ndarray:
    """Call ``module_forward`` on NCHW float32 input and return [N, D] float32."""
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    out = module_forward(x)
    return out.reshape(out.shape[0], -1).astype(np.float32)
