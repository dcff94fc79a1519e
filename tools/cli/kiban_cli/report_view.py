"""The terminal view of a report: the decision, the comparison and cost tables, verdicts and
warnings.

Reads the report JSON (schema kiban.report, docs/report.md) only; the full document is report.md.
Model names, labels, device names and every sentence quoting them are data: they go through
``kiban_cli.common.shown`` (markup escaped, control and bidi characters shown as ``\x1b``),
so they are displayed as typed and never interpreted by rich.
"""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from kiban.records import report_prefix
from kiban.store import ObjectStore
from kiban_cli.common import console, shown


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


NIGHTS_PER_MONTH = 30


def project(cost: dict[str, Any], volume: int) -> dict[str, Any]:
    """The reporter's cost projection (kiban_reporter.cost.project_cost) from a stored cost
    section, for another nightly volume: no re-evaluation needed."""
    s1k, d1k = cost.get("seconds_per_1k"), cost.get("device_seconds_per_1k")
    price = cost.get("price_per_hour")
    hours = volume * s1k / 1000 / 3600 if s1k is not None else None
    night = hours * price if hours is not None and price is not None else None
    return {
        "volume_images_per_night": volume,
        "hours_per_night": hours,
        "device_hours_per_night": volume * d1k / 1000 / 3600 if d1k is not None else None,
        "price_per_night": night,
        "price_per_month": night * NIGHTS_PER_MONTH if night is not None else None,
        "currency": cost.get("currency", ""),
    }


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _print_decision(report: dict[str, Any]) -> None:
    decision = report.get("decision")
    if decision:
        console.print(f"[bold green]Decision:[/] [bold]{shown(decision['line'])}[/]")
        for note in decision.get("notes", []):
            console.print(f"  [dim]note: {shown(note)}[/]")
    else:
        console.print("[bold]Decision:[/] none — the batch was not scored")


def _print_cost(report: dict[str, Any], volume: int | None) -> None:
    models = report["models"]
    if not models:
        return
    cur = shown(models[0]["cost"]["currency"])
    projections = {
        m["name"]: project(m["cost"], volume) if volume else m["cost"].get("projection")
        for m in models
    }
    projected = [p for p in projections.values() if p]
    table = Table(title="cost (measured by the encoder)", show_lines=False)
    cols = ["model", "device", "cores", "p50 s/batch", "device-s/1k", "storage/1M img"]
    if projected:
        cols += ["h/night", "device-h/night", f"{cur}/night", f"{cur}/month"]
    for col in cols:
        table.add_column(col, overflow="fold")
    for m in models:
        cost = m["cost"]
        unit = (
            "core" if cost.get("device_seconds_unit", "core-seconds") == "core-seconds" else "gpu"
        )
        d1k = cost.get("device_seconds_per_1k")
        row = [
            shown(m["name"]),
            shown(str(cost.get("device", "–")))
            + (" [yellow](mixed)[/]" if cost.get("mixed_devices") else ""),
            str(cost.get("cores") or "–"),
            _fmt(cost.get("p50_batch_seconds"), 3),
            "–" if d1k is None else f"{d1k:.1f} {unit}-s",
            _bytes(cost.get("storage_bytes_per_million")),
        ]
        if projected:
            pr = projections[m["name"]] or {}
            row += [
                _fmt(pr.get("hours_per_night"), 2),
                _fmt(pr.get("device_hours_per_night"), 2),
                _fmt(pr.get("price_per_night"), 2),
                _fmt(pr.get("price_per_month"), 2),
            ]
        table.add_row(*row)
    console.print(table)
    if projected:
        vol = projected[0]["volume_images_per_night"]
        console.print(f"projection: {vol:,} images a night, one worker like the one that ran")


def print_summary(report: dict[str, Any], location: str, volume: int | None = None) -> None:
    """The decision line first, then the quality and cost tables, verdicts and warnings.

    ``volume``: recompute the cost projection for that many images a night from the stored
    throughput (the stored projection is shown otherwise).
    """
    hk = report["protocol"]["headline_k"]
    batch = report["batch"]
    _print_decision(report)
    console.print(
        f"[bold]batch {shown(report['batch_id'])}[/] (report {shown(report['version'])}): "
        f"{batch['n_accepted']} images, {batch['n_quarantined']} quarantined, "
        f"{batch['n_duplicates']} duplicates; protocol {shown(report['protocol']['name'])}"
    )
    search = report["protocol"].get("search")
    if search:  # what is exact at this size (older reports have none)
        console.print(f"search: {shown(search['statement'])}")
    cur = shown(report["models"][0]["cost"]["currency"]) if report["models"] else ""
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
            shown(m["name"]),
            shown(m["family"]),
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
    _print_cost(report, volume)
    for verdict in report["verdicts"]:
        console.print(f"• {shown(verdict)}")
    curves = report.get("learning_curves")
    if curves:
        console.print(f"labelled set: {shown(curves['statement'])}")
    trend = report.get("trend") or {}
    for model in trend.get("models", []):
        if model.get("regression"):
            console.print(f"[red]regression:[/] {shown(model['statement'])}")
    for warning in report["warnings"][:10]:
        console.print(f"[yellow]warning:[/] {shown(warning)}")
    if len(report["warnings"]) > 10:
        console.print(f"[yellow]… {len(report['warnings']) - 10} more warnings in the report[/]")
    console.print(
        f"full report: {shown(location)}/report.html (also report.md, report.json)",
        soft_wrap=True,
    )


def print_report(
    store: ObjectStore, batch_id: str, version: str, volume: int | None = None
) -> None:
    """The summary of one stored report version (what `kiban run` prints at the end)."""
    prefix = f"{report_prefix(batch_id)}/{version}"
    print_summary(json.loads(store.get(f"{prefix}/report.json")), f"{store.uri}/{prefix}", volume)
