"""The card's ``training`` record: enough to redo a specialist and to prove what it never saw."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from kiban.messages import TrainSpecialist
from kiban.models.card import TrainingProvenance
from kiban_trainer.selection import Selection

LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "pytorch-metric-learning",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "numpy",
    "kiban",
)


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_label(device: str = "cpu") -> str:
    """e.g. ``cpu (AMD EPYC 7B13, 2 threads)`` or ``cuda (NVIDIA H200)``."""
    import torch

    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def training_provenance(
    msg: TrainSpecialist,
    selection: Selection,
    base_source: str,
    objective: str,
    epochs: int,
    loss_per_epoch: list[float],
    wall_seconds: float,
    device: str,
) -> TrainingProvenance:
    """Fill the record from the message, the selection and what training measured."""
    return TrainingProvenance(
        mode=msg.mode,
        base_model=msg.base,
        base_source=base_source,
        batches=sorted(dict.fromkeys(msg.batches)),
        split=selection.describe(),
        training_set_sha256=selection.digest,
        n_images=len(selection.images),
        images_per_class=selection.images_per_class,
        objective=objective,
        epochs=epochs,
        seed=msg.seed,
        loss_per_epoch=[round(v, 6) for v in loss_per_epoch],
        wall_seconds=round(wall_seconds, 3),
        device=device,
        libraries=library_versions(),
    )


def worker_threads() -> int:
    """Cores this process may use (the cgroup/affinity view, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
