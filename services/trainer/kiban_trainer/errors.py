"""Errors of the trainer: one clear line for the person (and the dead letter's reason)."""

from __future__ import annotations

from kiban.errors import KibanError


class TrainingError(KibanError):
    """The specialist cannot be trained or published as asked; the message says why."""
