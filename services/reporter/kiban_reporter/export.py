"""Hand a report to another team's bucket or folder: a copy, never a move.

Writes only ``destination/<batch>/<version>/report.{json,md}``: in distributed mode the
destination must be allowed (``kiban.locations.check_location``), the store never writes
through a symbolic link, and a place that cannot be written is one StoreError naming it.
"""

from __future__ import annotations

from kiban.context import Context
from kiban.errors import KibanError
from kiban.locations import check_location
from kiban.messages import ExportReport
from kiban.records import latest_report_version, report_prefix
from kiban.store import open_store


def export_report(msg: ExportReport, ctx: Context) -> list[str]:
    """Copy report.json and report.md to ``destination/<batch>/<version>/``."""
    destination = check_location(msg.destination, ctx.settings, "export destination")
    version = msg.report_version or latest_report_version(ctx.store, msg.batch_id)
    if version is None:
        raise KibanError(f"batch {msg.batch_id!r} has no report to export")
    target = open_store(
        destination, ctx.settings.s3_endpoint_url, ctx.settings.s3_region, create=True
    )
    written = []
    for name in ("report.json", "report.md"):
        data = ctx.store.get(f"{report_prefix(msg.batch_id)}/{version}/{name}")
        key = f"{msg.batch_id}/{version}/{name}"
        target.put(key, data)
        written.append(f"{target.uri}/{key}")
    return written
