"""``kiban report show BATCH --html [--out PATH]``: write a report's self-contained HTML page.

The page stored beside the JSON (``report.html``) is copied as is; a report written before
the HTML existed is rendered from its ``report.json`` (needs the ``reporter`` extra, which
brings matplotlib for the figures).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from kiban.errors import KibanError
from kiban.records import report_prefix
from kiban.store import ObjectStore


def default_html_path(home: Path, batch_id: str, version: str) -> Path:
    """``<KIBAN_HOME>/reports/<batch>-<version>.html`` (a batch id is made file-name safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", batch_id).strip("._") or "batch"
    return home / "reports" / f"{safe}-{version}.html"


def report_html(store: ObjectStore, batch_id: str, version: str) -> bytes:
    """The stored page, or one rendered from the stored JSON for older reports."""
    prefix = f"{report_prefix(batch_id)}/{version}"
    if store.exists(f"{prefix}/report.html"):
        return store.get(f"{prefix}/report.html")
    try:
        from kiban_reporter.html import render_html
        from kiban_reporter.report import Report
    except ImportError as exc:
        raise KibanError(
            f"report {batch_id}/{version} has no stored report.html and rendering one needs "
            f"the reporter extra: pip install 'kiban[reporter]' ({exc})"
        ) from None
    try:
        report = Report.model_validate_json(store.get(f"{prefix}/report.json"))
    except ValidationError as exc:
        raise KibanError(
            f"{store.uri}/{prefix}/report.json is not a report this version can read: "
            f"{exc.error_count()} errors, first: {exc.errors()[0]['msg']}"
        ) from None
    return render_html(report).encode()


def write_report_html(
    store: ObjectStore, batch_id: str, version: str, out: Path | None, home: Path
) -> Path:
    """Write the page to ``out`` (default: :func:`default_html_path`); returns the path."""
    data = report_html(store, batch_id, version)
    path = out if out is not None else default_html_path(home, batch_id, version)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise KibanError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
