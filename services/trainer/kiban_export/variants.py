"""Precision variants: an exported model quantised to int8 (or cast to fp16), as its own model.

Made by ``kiban models quantize NAME --to int8|fp16`` or in one go at export time by ``kiban
models export SPEC --name N --precision int8|fp16`` (the fp32 export is published as N, the
variant as N-int8 / N-fp16); both commands go through ``kiban_cli.models.publish_variant``.

The variant keeps the standard interface (uint8 NHWC ``images`` in, float32 ``embedding``
out); only the weights and the arithmetic inside change. Its card names the parent (name +
sha256), the precision and mode, the calibration images (batch + digest), the parity in
retrieval terms and the speed-up measured here.

Parity in retrieval terms: on validation crops the variant's embeddings are compared with the
parent's — worst/mean cosine and the **top-k neighbour overlap** (for each image, the share of
its k nearest neighbours by cosine, self excluded, that both models agree on). The paired MV@k
macro-F1 difference with its CI is *not* computed here: the export tool does not import the
reporter. Run a batch with both the parent and the variant (`kiban run … --model P --model V`):
the report states the paired difference and the verdict says whether the cheaper variant is
non-inferior. Outside the tolerance (``KIBAN_VARIANT_MIN_OVERLAP``) the variant is still
published, with the warning on its card and printed by the CLI — never silently.

int8 modes: ``dynamic`` (weights int8, activations quantised per call; fast for the MatMuls of
transformers, very slow for convolutions on CPU) and ``static-qdq`` (QDQ with activation ranges
calibrated on real images). ``auto`` builds both and keeps the faster one whose parity holds,
measured interleaved on this machine with the same crops and threads.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kiban.messages import is_valid_name
from kiban.models.card import ModelCard, VariantInfo
from kiban_export.errors import ExportError
from kiban_export.parity import cosines, ort_session

PRECISIONS = ("int8", "fp16")
MODES = ("auto", "dynamic", "static")
NEIGHBOUR_K = 5
# A candidate whose worst cosine falls below this is not offered by `auto` (it is broken,
# not merely imprecise); the overlap tolerance is the user-facing criterion.
SANE_COSINE = 0.9


@dataclass
class Calibration:
    """uint8 crops [N, S, S, 3] with where they came from."""

    crops: np.ndarray
    batch: str | None
    sha256s: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str | None:
        if not self.sha256s:
            return None
        return hashlib.sha256("\n".join(sorted(self.sha256s)).encode()).hexdigest()


def machine() -> str:
    """'<CPU model>, N cores' (Linux /proc/cpuinfo, else platform)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def batch_calibration(store: Any, source: Any, batch_id: str, n: int, prep: Any) -> Calibration:
    """Up to ``n`` crops of a stored batch's accepted images, evenly spread over the batch,
    decoded and preprocessed exactly as the encoder does (sha256 checked)."""
    from kiban.imaging import ImageRejected, decode_image, preprocess
    from kiban.records import read_records

    records = read_records(store, batch_id)
    if not records:
        raise ExportError(f"batch {batch_id!r} has no accepted images")
    step = max(1, len(records) // n)
    crops, shas = [], []
    for rec in records[::step]:
        data = source.get(rec.key)
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            continue  # changed since ingest: not the batch's image any more
        try:
            crops.append(preprocess(decode_image(data), prep))
        except ImageRejected:
            continue
        shas.append(rec.sha256)
        if len(crops) >= n:
            break
    if len(crops) < 2:
        raise ExportError(f"batch {batch_id!r}: fewer than 2 readable images for calibration")
    return Calibration(np.stack(crops), batch_id, shas)


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = NEIGHBOUR_K) -> float:
    """Mean |topk_a(i) ∩ topk_b(i)| / k over images (cosine, self excluded)."""
    n = len(a)
    k = min(k, n - 1)
    if k < 1:
        raise ExportError("neighbour overlap needs at least 2 validation images")

    def topk(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    ta, tb = topk(a), topk(b)
    shared = [len(set(ta[i]) & set(tb[i])) for i in range(n)]
    return float(np.mean(shared) / k)


def _embed(path: Path, crops: np.ndarray, threads: int, batch: int = 16) -> np.ndarray:
    session = ort_session(path, threads)
    outs = [
        session.run(None, {"images": crops[i : i + batch]})[0] for i in range(0, len(crops), batch)
    ]
    return np.concatenate(outs).astype(np.float32)


def measure_rates(
    paths: dict[str, Path], crops: np.ndarray, threads: int, rounds: int = 3, seconds: float = 1.0
) -> dict[str, float]:
    """ORT img/s per graph on the same crops and threads, runs interleaved (median of rounds):
    shared machines drift, so graphs are timed side by side, never one after the other."""
    sessions = {name: ort_session(p, threads) for name, p in paths.items()}
    for s in sessions.values():
        s.run(None, {"images": crops[:2]})  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, s in sessions.items():
            n, started = 0, time.perf_counter()
            while True:
                s.run(None, {"images": crops})
                n += len(crops)
                elapsed = time.perf_counter() - started
                if elapsed >= seconds:
                    break
            samples[name].append(n / elapsed)
    return {name: round(statistics.median(v), 2) for name, v in samples.items()}


def _quantize_dynamic(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        # fused graphs hold contrib ops shape inference cannot type
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _quantize_static(src: Path, dst: Path, crops: np.ndarray) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        """uint8 crops, a few images per call."""

        def __init__(self) -> None:
            self._it = iter([{"images": crops[i : i + 8]} for i in range(0, len(crops), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def quantize_model(
    parent: ModelCard,
    parent_path: Path,
    name: str,
    workdir: Path,
    to: str,
    calibration: Calibration,
    validation: Calibration,
    mode: str = "auto",
    min_overlap: float = 0.8,
    threads: int | None = None,
) -> tuple[ModelCard, Path]:
    """Build the variant in ``workdir``; return its card and ONNX path (publishing is the
    caller's). ``calibration`` feeds static quantisation; ``validation`` the parity and the
    speed measurement (the same crops for every graph)."""
    from kiban.models.registry import sha256_file
    from kiban_export.exporter import _versions

    if not is_valid_name(name):
        raise ExportError(f"invalid model name {name!r}: use letters, digits, . _ -")
    if name == parent.name:
        raise ExportError("a variant needs its own name (--name)")
    if to not in PRECISIONS:
        raise ExportError(f"--to must be one of {PRECISIONS}, not {to!r}")
    if mode not in MODES:
        raise ExportError(f"--mode must be one of {MODES}, not {mode!r}")
    if parent.variant is not None:
        raise ExportError(f"{parent.name!r} is already a {parent.variant.precision} variant")
    if len(validation.crops) < 2:
        raise ExportError("validation needs at least 2 images")
    threads = threads or default_threads()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    candidates: dict[str, Path] = {}
    warnings: list[str] = []
    started = time.perf_counter()
    if to == "fp16":
        _to_fp16(parent_path, workdir / "fp16.onnx")
        candidates["fp16"] = workdir / "fp16.onnx"
        warnings.append(
            "fp16 is for GPU providers: its CPU speed-up below is not what a GPU will show"
        )
    else:
        if mode in ("auto", "dynamic"):
            _quantize_dynamic(parent_path, workdir / "dynamic.onnx")
            candidates["dynamic"] = workdir / "dynamic.onnx"
        if mode in ("auto", "static"):
            _quantize_static(parent_path, workdir / "static.onnx", calibration.crops)
            candidates["static-qdq"] = workdir / "static.onnx"
    parent_emb = _embed(parent_path, validation.crops, threads)
    parity: dict[str, tuple[float, float, float]] = {}
    for cand, path in candidates.items():
        emb = _embed(path, validation.crops, threads)
        if not np.isfinite(emb).all():
            parity[cand] = (-1.0, -1.0, 0.0)
            continue
        cos = cosines(emb, parent_emb)
        parity[cand] = (
            float(cos.min()),
            float(cos.mean()),
            neighbour_overlap(parent_emb, emb),
        )
    rates = measure_rates({"parent": parent_path, **candidates}, validation.crops, threads)
    sane = [c for c in candidates if parity[c][0] >= SANE_COSINE]
    pool = sane or list(candidates)
    chosen = max(pool, key=lambda c: (parity[c][2] >= min_overlap, rates[c]))
    min_cos, mean_cos, overlap = parity[chosen]
    speedup = round(rates[chosen] / rates["parent"], 3)
    within = overlap >= min_overlap
    if not within:
        warnings.append(
            f"top-{min(NEIGHBOUR_K, len(validation.crops) - 1)} neighbour overlap with "
            f"{parent.name} is {overlap:.3f} < {min_overlap} (KIBAN_VARIANT_MIN_OVERLAP): "
            "retrieval may differ from the parent; check the paired MV@k difference in a report"
        )
    if speedup < 1.0:
        warnings.append(
            f"{chosen} int8 is slower than its parent here ({speedup:.2f}×, {machine()}): "
            "not worth running on this machine"
            if to == "int8"
            else f"{chosen} runs at {speedup:.2f}× its parent on this CPU"
        )
    if min_cos < SANE_COSINE:
        warnings.append(f"worst cosine with the parent is {min_cos:.4f}")
    out = workdir / f"{name}.onnx"
    candidates[chosen].replace(out)
    info = VariantInfo(
        parent=parent.name,
        parent_sha256=parent.sha256,
        precision=to,
        mode=chosen,
        calibration_batch=calibration.batch if chosen == "static-qdq" else None,
        calibration_sha256=calibration.digest if chosen == "static-qdq" else None,
        calibration_images=len(calibration.crops) if chosen == "static-qdq" else 0,
        validation_batch=validation.batch,
        validation_sha256=validation.digest,
        validation_images=len(validation.crops),
        min_cosine=min_cos,
        mean_cosine=mean_cos,
        neighbour_k=min(NEIGHBOUR_K, len(validation.crops) - 1),
        neighbour_overlap=overlap,
        min_overlap=min_overlap,
        within_tolerance=within,
        speedup=speedup,
        images_per_second=rates,
        threads=threads,
        machine=machine(),
        warnings=warnings,
    )
    notes = [
        f"{to} variant of {parent.name} ({chosen}); candidates measured "
        + ", ".join(
            f"{c}: {rates[c]} img/s, overlap {parity[c][2]:.3f}, min cos {parity[c][0]:.4f}"
            for c in candidates
        )
        + f"; parent {rates['parent']} img/s ({threads} threads)",
        f"quantize + parity + timing took {time.perf_counter() - started:.1f} s",
    ]
    card = parent.model_copy(
        update={
            "name": name,
            "source": f"variant:{parent.name}:{to}",
            "file_size": out.stat().st_size,
            "sha256": sha256_file(out),
            "parity": None,
            "variant": info,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "exporter": _versions(),
            "notes": [*parent.notes, *notes],
        },
        deep=True,
    )
    return card, out


def validation_split(crops: Calibration, n_calibration: int) -> tuple[Calibration, Calibration]:
    """Split one set of crops: first ``n_calibration`` calibrate, the rest validate (all
    validate when too few remain)."""
    if len(crops.crops) - n_calibration < 8:
        return crops, crops
    cal = Calibration(crops.crops[:n_calibration], crops.batch, crops.sha256s[:n_calibration])
    val = Calibration(crops.crops[n_calibration:], crops.batch, crops.sha256s[n_calibration:])
    return cal, val


def as_crops(images: Sequence[Any], prep: Any, batch: str | None = None) -> Calibration:
    """PIL images → Calibration (no sha256s: synthetic or ad-hoc images)."""
    from kiban.imaging import preprocess

    return Calibration(np.stack([preprocess(i.convert("RGB"), prep) for i in images]), batch)
