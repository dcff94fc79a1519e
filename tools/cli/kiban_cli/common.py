"""Helpers shared by CLI commands: settings, the store, clean errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from kiban.errors import KibanError
from kiban.settings import Settings, load_settings, use_settings
from kiban.store import ObjectStore, open_store
from kiban.telemetry import redact, setup_logging

# Tables stay readable when output is piped (CI logs, files): no 80-column squeeze.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fails_cleanly(fn: F) -> F:
    """Turn kiban errors into one red line and exit code 2 (no traceback for users)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KibanError as exc:
            err_console.print(f"[bold red]error:[/] {redact(str(exc))}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def settings_and_store() -> tuple[Settings, ObjectStore]:
    settings = load_settings()
    use_settings(settings)
    setup_logging(settings.log_level)
    store = open_store(
        settings.resolved_store_uri, settings.s3_endpoint_url, settings.s3_region, create=True
    )
    return settings, store
