"""Errors of the export tool: one clear line for the person at the terminal."""

from __future__ import annotations

from kiban.errors import KibanError


class ExportError(KibanError):
    """The model could not be built, loaded, exported or verified."""


class SpecError(ExportError):
    """The export SPEC string is malformed or names something that does not exist."""
