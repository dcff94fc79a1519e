"""The terminal view of a report: the comparison table, verdicts and warnings.

Reads the report JSON (schema kiban.report, docs/report.md) only; the full document is report.md.
"""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from kiban.records import report_prefix
from kiban.store import ObjectStore
from kiban_cli.common import console


def _metric(model: dict[str, Any], k: int, key: str, ci: bool = False) -> str:
    retrieval = model.get("retrieval")
    if not retrieval:
        return "–"
    for m in retrieval["metrics"]:
        if m["k"] == k and m[key]["value"] is not None:
            est = m[key]
            if ci and est.get("ci_low") is not None:
                return f"{est['value']:.3f} [{est['ci_low']:.2f}–{est['ci_high']:.2f}]"
            return f"{est['value']:.3f}"
    return "–"


def _fmt(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def print_summary(report: dict[str, Any], location: str) -> None:
    hk = report["protocol"]["headline_k"]
    batch = report["batch"]
    console.print(
        f"[bold]batch {report['batch_id']}[/] (report {report['version']}): "
        f"{batch['n_accepted']} images, {batch['n_quarantined']} quarantined, "
        f"{batch['n_duplicates']} duplicates; protocol {report['protocol']['name']}"
    )
    cur = report["models"][0]["cost"]["currency"] if report["models"] else ""
    table = Table(show_lines=False)
    for col in (
        "model",
        "family",
        "trained",
        "dim",
        "params M",
        "GMACs",
        "MV@1 acc",
        f"MV@{hk} acc",
        f"MV@{hk} macro-F1 [95% CI]",
        f"mAP@{hk}",
        "img/s",
        "s/1k img",
        f"{cur}/1k img",
    ):
        table.add_column(col, overflow="fold")
    for m in report["models"]:
        cost = m["cost"]
        table.add_row(
            m["name"],
            m["family"],
            "yes" if m["pretrained"] else "[red]no[/]",
            str(m["embedding_dim"]),
            f"{m['params'] / 1e6:.1f}",
            _fmt((cost.get("macs_per_image") or 0) / 1e9 or None, 2),
            _metric(m, 1, "mv_accuracy"),
            _metric(m, hk, "mv_accuracy"),
            _metric(m, hk, "mv_macro_f1", ci=True),
            _metric(m, hk, "map_at_k"),
            _fmt(cost["encode_images_per_second"], 1),
            _fmt(cost["seconds_per_1k"], 1),
            _fmt(cost["cost_per_1k"], 4),
        )
    console.print(table)
    for verdict in report["verdicts"]:
        console.print(f"• {verdict}")
    for warning in report["warnings"][:10]:
        console.print(f"[yellow]warning:[/] {warning}")
    if len(report["warnings"]) > 10:
        console.print(f"[yellow]… {len(report['warnings']) - 10} more warnings in the report[/]")
    console.print(f"full report: {location}/report.md (JSON: report.json)")


def print_report(store: ObjectStore, batch_id: str, version: str) -> None:
    """The summary of one stored report version (what `kiban run` prints at the end)."""
    prefix = f"{report_prefix(batch_id)}/{version}"
    print_summary(json.loads(store.get(f"{prefix}/report.json")), f"{store.uri}/{prefix}")
