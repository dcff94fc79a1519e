"""The trainer worker: `python -m kiban.worker trainer` serves the train queue, and its task
module is cheap to import (torch loads when a message is served)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kiban.messages import TrainSpecialist
from kiban.settings import Settings
from kiban.worker import SERVICES, resolve


def test_trainer_service_serves_the_train_queue(tmp_path: Path) -> None:
    assert "trainer" in SERVICES
    spec = resolve("trainer", Settings(home=tmp_path), None)  # type: ignore[call-arg]
    assert spec.modules == ("kiban_trainer.tasks",)
    assert spec.queues == (TrainSpecialist.queue,) == ("train",)


def test_task_module_registers_the_task_without_torch() -> None:
    code = (
        "import sys, kiban.worker, kiban_trainer.tasks\n"
        "from kiban.celery_app import app\n"
        f"assert {TrainSpecialist.task!r} in app.tasks\n"
        "print(','.join(m for m in ('torch', 'onnx', 'PIL', 'kiban_export', 'kiban_cli') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""
