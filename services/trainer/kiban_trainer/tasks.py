"""Celery task of the trainer container: train a specialist and publish it to the registry.

Cheap to import (torch loads when a message is served), like every service's task module.
"""

from __future__ import annotations

from typing import Any

from kiban.context import Context
from kiban.messages import TrainSpecialist
from kiban.tasks import kiban_task


@kiban_task(TrainSpecialist)
def train_specialist_task(msg: TrainSpecialist, ctx: Context) -> dict[str, Any]:
    """Train ``msg.name`` from the training side of ``msg.batches``; publish model + card."""
    from kiban_trainer.train import train_specialist

    card = train_specialist(msg, ctx)
    return {"name": card.name, "sha256": card.sha256}
