"""ONNX Runtime sessions: providers in the configured order, and the truth about which ran.

onnxruntime-gpu imports on a CPU-only machine and silently falls back to the CPU, so the
provider that really runs is read back from the session and recorded with every shard.

Session options are chosen for the cores this process may actually use (its CPU affinity, not
the host's core count) and recorded with every shard (``ShardMeta.session``). The GPU paths
(IO binding, TensorRT engine cache, fp16) are only taken when a GPU provider really runs;
the CPU path is unchanged by them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiban.models.registry import sha256_file

log = logging.getLogger(__name__)

# ONNX Runtime (Linux wheels too, since 1.2x) starts Microsoft's 1DS telemetry when the library
# loads: a device ID and an event database in ~/.cache/Microsoft/DeveloperTools/.onnxruntime, a
# session file in $TMPDIR, events queued for upload. ORT_DISABLE_TELEMETRY, read at load time,
# switches all of it off, so it is set here, before onnxruntime is first imported (lazily,
# below); ``disable_telemetry_events`` covers builds that log through ETW instead.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")

# Below this many usable cores a core reserved for decoding would idle most of the time for a
# transformer (decode is a small share of its work), so ORT keeps every core and stops
# spin-waiting instead, which lets the decode threads be scheduled between its kernels.
MIN_CORES_TO_RESERVE_DECODE = 4


def affinity_cores() -> int:
    """CPU cores this process may run on (its affinity mask; the host count where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    """ORT's thread counts for one session, and whether its pool may spin-wait."""

    intra_op: int
    inter_op: int
    allow_spinning: bool


def plan_threads(threads: int, decode_workers: int, usable: int) -> ThreadPlan:
    """Intra-op threads for ``KIBAN_THREADS=threads`` beside ``decode_workers`` decode threads.

    ``threads > 0`` is taken as given. ``threads == 0`` means "the cores that are there": the
    usable cores minus the decode threads (at least one), so the two pools do not fight over
    cores; on small machines (fewer than MIN_CORES_TO_RESERVE_DECODE cores) ORT keeps all of
    them instead. Whenever the two pools together outnumber the cores, ORT's threads do not
    spin-wait, so a decode thread is not starved by an idle spinning worker. Inter-op is 1:
    the encoders are sequential graphs, parallel branches only add threads.
    """
    usable = max(1, usable)
    decode = max(0, decode_workers)
    if threads > 0:
        intra = threads
    elif usable >= MIN_CORES_TO_RESERVE_DECODE:
        intra = max(1, usable - decode)
    else:
        intra = usable
    return ThreadPlan(intra_op=intra, inter_op=1, allow_spinning=intra + decode <= usable)


def trt_cache_dir(cache_root: Path, model_sha256: str) -> Path:
    """TensorRT engine/timing cache of one model: ``<cache_root>/trt/<sha256[:16]>``.

    ``cache_root`` is ``<KIBAN_HOME>/cache``. The input shape is the second half of the key:
    TensorRT names each engine file after its profile shapes inside this directory.
    """
    digest = model_sha256.strip().lower()
    if len(digest) < 16 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a sha256 hex digest: {model_sha256!r}")
    return cache_root / "trt" / digest[:16]


def trt_profile_shape(input_name: str, batch: int, side: int, channels: int = 3) -> str:
    """A TensorRT profile shape for the uint8 NHWC input, e.g. ``pixels:128x224x224x3``."""
    if batch < 1 or side < 1:
        raise ValueError(f"batch and side must be >= 1, got {batch}, {side}")
    return f"{input_name}:{batch}x{side}x{side}x{channels}"


def trt_provider_options(
    cache_dir: Path, input_name: str, batch_size: int, side: int, fp16: bool = True
) -> dict[str, str]:
    """TensorrtExecutionProvider options: engine + timing cache in ``cache_dir``, one profile
    from 1 to ``batch_size`` images (optimised for ``batch_size``), fp16 where allowed.

    Values are strings, as ORT's provider-option parser expects.
    """
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_profile_min_shapes": trt_profile_shape(input_name, 1, side),
        "trt_profile_opt_shapes": trt_profile_shape(input_name, batch_size, side),
        "trt_profile_max_shapes": trt_profile_shape(input_name, batch_size, side),
    }


def cuda_provider_options() -> dict[str, str]:
    """CUDAExecutionProvider options: an arena that grows by what is asked (not doubling, so a
    large batch does not reserve twice its memory) and a one-off cuDNN algorithm search."""
    return {
        "device_id": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "True",
    }


def provider_list(
    providers: list[str], trt: dict[str, str] | None
) -> list[str | tuple[str, dict[str, str]]]:
    """ORT's ``providers=`` argument: GPU providers with their options, the CPU one bare."""
    out: list[str | tuple[str, dict[str, str]]] = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            if trt is None:  # no cache location known: TensorRT would rebuild every start
                log.info("TensorRT skipped: no model sha256 / input side for its engine cache")
                continue
            out.append((p, trt))
        elif p == "CUDAExecutionProvider":
            out.append((p, cuda_provider_options()))
        else:
            out.append(p)
    return out


def session_record(plan: ThreadPlan, provider: str, fp16: bool) -> dict[str, str | int]:
    """What is recorded with every shard (``ShardMeta.session``)."""
    record: dict[str, str | int] = {
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "intra_op_threads": plan.intra_op,
        "inter_op_threads": plan.inter_op,
        "allow_spinning": int(plan.allow_spinning),
        "cpu_mem_arena": 1,
        "mem_pattern": 1,
        "execution_mode": "ORT_SEQUENTIAL",
    }
    if provider in GPU_PROVIDERS:
        record["io_binding"] = 1
        record["gpu_arena_extend_strategy"] = "kSameAsRequested"
    if provider == "TensorrtExecutionProvider":
        record["trt_fp16"] = int(fp16)
    return record


@dataclass
class LoadedModel:
    session: object  # onnxruntime.InferenceSession (kept untyped: optional dependency)
    provider: str
    threads: int
    input_name: str
    output_name: str
    options: dict[str, str | int] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    def run(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC → float32 [N, D] raw embeddings."""
        if self.on_gpu:
            return self._run_bound(images)
        out = self.session.run([self.output_name], {self.input_name: images})  # type: ignore[attr-defined]
        return np.asarray(out[0], dtype=np.float32)

    def _run_bound(self, images: np.ndarray) -> np.ndarray:
        """GPU: IO binding; the output stays on the device (ORT allocates it there) and is
        copied to the host exactly once, instead of ORT's own staging copy per call."""
        binding = self.session.io_binding()  # type: ignore[attr-defined]
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(images))
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)  # type: ignore[attr-defined]
        out = binding.copy_outputs_to_cpu()[0]
        return np.asarray(out, dtype=np.float32)


_CACHE: dict[tuple[object, ...], LoadedModel] = {}
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
    path: Path,
    providers: list[str],
    threads: int,
    input_name: str,
    output_name: str,
    *,
    decode_workers: int = 0,
    gpu_batch_size: int = 128,
    image_side: int | None = None,
    model_sha256: str | None = None,
    cache_root: Path | None = None,
    fp16: bool = True,
) -> LoadedModel:
    """Create (once per process) an inference session for ``path``.

    ``decode_workers`` feeds the thread choice (``plan_threads``); ``gpu_batch_size``,
    ``image_side``, ``model_sha256`` and ``cache_root`` (``<KIBAN_HOME>/cache``) are used only
    when TensorRT is usable here (its profile shapes and engine cache).
    """
    import onnxruntime as ort

    plan = plan_threads(threads, decode_workers, affinity_cores())
    key = (str(path), tuple(providers), threads, plan, gpu_batch_size, image_side, fp16)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        ort.disable_telemetry_events()  # and ETW events (Windows builds) off too
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = plan.intra_op
        options.inter_op_num_threads = plan.inter_op
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = True
        options.enable_mem_pattern = True
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if plan.allow_spinning else "0"
        )
        options.log_severity_level = 3
        usable = usable_providers(providers)
        trt = None
        if "TensorrtExecutionProvider" in usable and image_side and cache_root is not None:
            digest = model_sha256 or sha256_file(path)
            cache = trt_cache_dir(cache_root, digest)
            cache.mkdir(parents=True, exist_ok=True)
            trt = trt_provider_options(cache, input_name, gpu_batch_size, image_side, fp16)
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=provider_list(usable, trt)
        )
        ran = session.get_providers()[0]
        record = session_record(plan, ran, fp16)
        loaded = LoadedModel(session, ran, threads, input_name, output_name, record)
        log.info(
            "loaded %s on %s (intra-op threads=%d, spinning=%s)",
            path.name,
            ran,
            plan.intra_op,
            plan.allow_spinning,
        )
        _CACHE[key] = loaded
        return loaded
