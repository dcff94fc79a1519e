"""ONNX Runtime sessions: providers in the configured order, and the truth about which ran.

onnxruntime-gpu imports on a CPU-only machine and silently falls back to the CPU, so the
provider that really runs is read back from the session and recorded with every shard.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# ONNX Runtime (Linux wheels too, since 1.2x) starts Microsoft's 1DS telemetry when the library
# loads: a device ID and an event database in ~/.cache/Microsoft/DeveloperTools/.onnxruntime, a
# session file in $TMPDIR, events queued for upload. ORT_DISABLE_TELEMETRY, read at load time,
# switches all of it off, so it is set here, before onnxruntime is first imported (lazily,
# below); ``disable_telemetry_events`` covers builds that log through ETW instead.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"


@dataclass
class LoadedModel:
    session: object  # onnxruntime.InferenceSession (kept untyped: optional dependency)
    provider: str
    threads: int
    input_name: str
    output_name: str

    def run(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC → float32 [N, D] raw embeddings."""
        out = self.session.run([self.output_name], {self.input_name: images})  # type: ignore[attr-defined]
        return np.asarray(out[0], dtype=np.float32)


_CACHE: dict[tuple[str, tuple[str, ...], int], LoadedModel] = {}
_LOCK = threading.Lock()


# onnxruntime-gpu lists GPU providers even where the driver libraries are missing, then
# prints pages of errors while falling back; a cheap dlopen check keeps that out of logs.
_NEEDS_LIBRARY = {
    "CUDAExecutionProvider": "libcuda.so.1",
    "TensorrtExecutionProvider": "libnvinfer.so.10",
}


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def usable_providers(wanted: list[str]) -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    available = {p for p in available if p not in _NEEDS_LIBRARY or _loadable(_NEEDS_LIBRARY[p])}
    chosen = [p for p in wanted if p in available]
    skipped = [p for p in wanted if p not in available]
    if skipped:
        log.info("ONNX Runtime providers not available here, skipped: %s", ", ".join(skipped))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def load_model(
    path: Path, providers: list[str], threads: int, input_name: str, output_name: str
) -> LoadedModel:
    """Create (once per process) an inference session for ``path``."""
    import onnxruntime as ort

    key = (str(path), tuple(providers), threads)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        ort.disable_telemetry_events()  # and ETW events (Windows builds) off too
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=usable_providers(providers)
        )
        ran = session.get_providers()[0]
        loaded = LoadedModel(session, ran, threads, input_name, output_name)
        log.info("loaded %s on %s (threads=%s)", path.name, ran, threads or "all")
        _CACHE[key] = loaded
        return loaded
