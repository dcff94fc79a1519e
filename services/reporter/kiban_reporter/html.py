"""Render the report as one self-contained HTML page: every number comes from the JSON document.

``render_html(Report) -> str`` — the decision line first, then the figures (Pareto front,
learning curves, confusion matrices, per-class F1, trend) with the tables behind them, then the
metrics, comparisons, leakage, failures, warnings and protocol.

Self-contained: inline CSS, figures as inline SVG (``kiban_reporter.figures``), no script, no
link, no external URL. Every user string (labels, keys, model names, batch id, warnings,
reasons) is data: escaped with ``html.escape`` here, and never read as mathtext in the figures.
A figure whose input is missing or empty is replaced by a one-line note; a figure that fails
to draw is logged and replaced by a note too, so the page is always written.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial

from kiban.records import report_prefix
from kiban.store import ObjectStore
from kiban_reporter import figures
from kiban_reporter.decision_schema import NonInferiority
from kiban_reporter.metrics import Estimate, KMetrics
from kiban_reporter.report import ModelSection, Report

log = logging.getLogger(__name__)


class Html(str):
    """A string that is already HTML (built here from escaped parts); inserted as is."""


def e(value: object) -> str:
    """Escape one user or data string for element text and quoted attributes."""
    return value if isinstance(value, Html) else html.escape(str(value), quote=True)


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _signed(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def _est(est: Estimate | None) -> str:
    if est is None or est.value is None:
        return "–"
    if est.ci_low is None or est.ci_high is None:
        return f"{est.value:.3f}"
    return f"{est.value:.3f} [{est.ci_low:.3f}, {est.ci_high:.3f}]"


def _at(section: ModelSection, k: int) -> KMetrics | None:
    if section.retrieval is None:
        return None
    return next((m for m in section.retrieval.metrics if m.k == k), None)


def _headline(section: ModelSection, k: int) -> KMetrics | None:
    """The metrics at the headline k, else the largest k evaluated."""
    if section.retrieval is None or not section.retrieval.metrics:
        return None
    return _at(section, k) or section.retrieval.metrics[-1]


_NUMBER = re.compile(r"^(–|[+\-−]?\d)")


def _numeric(cell: object) -> bool:
    return isinstance(cell, int | float) or bool(_NUMBER.match(str(cell)))


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "", num_from: int = 1
) -> str:
    """A table; cells are escaped unless ``Html``; numbers from column ``num_from`` on are
    right-aligned."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{e(c)}</td>' if i >= num_from and _numeric(c) else f"<td>{e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    attr = f' class="{e(cls)}"' if cls else ""
    return (
        f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _section(sid: str, title: str, parts: Iterable[str]) -> str:
    return f'<section id="{e(sid)}"><h2>{e(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def _note(text: str, nid: str | None = None) -> str:
    attr = f' id="{e(nid)}"' if nid else ""
    return f'<p class="note"{attr}>{e(text)}</p>'


def _figure(fig_id: str, caption: str, draw: Callable[[], str]) -> str:
    """One ``<figure id=...>`` with its inline SVG, or a one-line note when it cannot be drawn."""
    try:
        svg = draw()
    except figures.NoDataError as exc:
        return _note(f"{caption}: not drawn — {exc}.", f"{fig_id}-note")
    except ImportError as exc:
        return _note(
            f"{caption}: not drawn — matplotlib is not installed ({exc}); "
            "pip install 'kiban[reporter]'.",
            f"{fig_id}-note",
        )
    except Exception as exc:  # a plotting bug must not cost the whole report
        log.warning("figure %s failed", fig_id, exc_info=True)
        return _note(
            f"{caption}: not drawn — the figure failed ({type(exc).__name__}: {exc}).",
            f"{fig_id}-note",
        )
    return f'<figure id="{e(fig_id)}">{svg}<figcaption>{e(caption)}</figcaption></figure>'


# ---------------------------------------------------------------------------------------------
# Sections, in page order


def _metric_name(report: Report) -> str:
    if report.decision is not None:
        return report.decision.metric
    return f"MV@{report.protocol.headline_k} macro-F1"


def _decision_line(report: Report) -> str:
    d = report.decision
    if d is not None:
        line, cls = d.line, "decision"
    elif any(s.retrieval is not None for s in report.models):
        line = (
            f"No decision recorded in this report (schema version {report.schema_version}); "
            "the verdicts below compare the models."
        )
        cls = "decision none"
    elif not report.batch.labelled or report.protocol.name == "none":
        line = "Not scored: the batch has no labels; its images were embedded and indexed only."
        cls = "decision none"
    else:
        line = "Not scored: no model was scored in this report (see the warnings)."
        cls = "decision none"
    out = [f'<p id="decision" class="{cls}">{e(line)}</p>']
    if d is not None:
        facts = [
            f"recommended: {d.recommended}" if d.recommended else "no recommendation",
            f"metric: {d.metric}",
            f"non-inferiority margin δ = {d.margin:g}",
            f"cost basis: {d.cost_basis}" + (f" ({d.currency})" if d.currency else ""),
        ]
        out.append(f'<p class="facts">{e(" · ".join(facts))}</p>')
        if d.notes:
            out.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in d.notes) + "</ul>")
    return "\n".join(out)


def _pareto(report: Report) -> list[str]:
    d = report.decision
    caption = (
        f"Quality ({round(report.protocol.confidence * 100)}% CI) against cost per 1,000 images;"
        " filled markers are on the front"
    )
    if d is None:
        return [_note(f"{caption}: not drawn — no decision in this report.", "fig-pareto-note")]
    out = [_figure("fig-pareto", caption, lambda: figures.pareto(d))]
    if d.pareto:
        cost_head = (
            f"cost / 1k img ({d.currency})"
            if d.cost_basis == "price per 1k images" and d.currency
            else ("s / 1k img" if d.cost_basis == "seconds per 1k images" else "cost / 1k img")
        )
        rows = []
        for p in d.pareto:
            q = "–" if p.quality is None else f"{p.quality:.3f}"
            if (
                p.quality is not None
                and p.quality_ci_low is not None
                and (p.quality_ci_high is not None)
            ):
                q += f" [{p.quality_ci_low:.3f}, {p.quality_ci_high:.3f}]"
            rows.append(
                [
                    p.model,
                    q,
                    _num(p.cost, 4),
                    "yes" if p.on_front else "no",
                    ", ".join(p.dominated_by) or "–",
                ]
            )
        out.append(
            _table(["model", d.metric, cost_head, "on the front", "dominated by"], rows, "pareto")
        )
    return out


def _ni_item(n: NonInferiority) -> str:
    ratio = f"cost ratio {n.cost_ratio:.3g}" if n.cost_ratio is not None else "cost ratio –"
    if not n.cost_comparable:
        ratio += " (costs measured on different devices/providers: not comparable)"
    detail = (
        f"{n.cheaper} − {n.reference} on {n.metric}: {_signed(n.difference)} "
        f"[{_signed(n.ci_low)}, {_signed(n.ci_high)}], margin δ = {n.margin:g}; {ratio}"
    )
    return (
        f'<li><span class="badge {e(n.outcome)}">{e(n.outcome)}</span> {e(n.statement)}'
        f'<br><span class="detail">{e(detail)}</span></li>'
    )


def _non_inferiority(report: Report) -> list[str]:
    d = report.decision
    if d is None or not d.non_inferiority:
        return [_note("No non-inferiority comparison in this report.")]
    return ['<ul class="ni">' + "".join(_ni_item(n) for n in d.non_inferiority) + "</ul>"]


def _cost(report: Report) -> list[str]:
    if not report.models:
        return [_note("No model in this report.")]
    cur = report.models[0].cost.currency
    rows = []
    for s in report.models:
        c = s.cost
        device_s = (
            f"{c.device_seconds_per_1k:.1f} {c.device_seconds_unit}"
            if c.device_seconds_per_1k is not None
            else "–"
        )
        rows.append(
            [
                s.name,
                f"{c.provider} ({c.device}"
                + (f", {c.cores} cores" if c.cores else "")
                + f", batch {c.batch_size})"
                + (" — mixed devices" if c.mixed_devices else ""),
                _num(c.encode_images_per_second, 1),
                _num(c.inference_images_per_second, 1),
                _num(c.seconds_per_1k, 1),
                device_s,
                _num(c.price_per_hour, 2),
                _num(c.cost_per_1k, 4),
                str(c.bytes_per_vector),
                _num(c.storage_bytes_per_million / 1e9 if c.storage_bytes_per_million else None, 2),
                f"{c.params / 1e6:.1f}",
                _num(c.macs_per_image / 1e9 if c.macs_per_image else None, 2),
                _num(c.model_file_bytes / 1e6, 1),
            ]
        )
    out = [
        _table(
            [
                "model",
                "provider (device)",
                "img/s end to end",
                "img/s inference",
                "s / 1k img",
                "device-s / 1k img",
                f"{cur} / hour",
                f"{cur} / 1k img",
                "bytes / vector",
                "GB / million in Qdrant",
                "params (M)",
                "GMACs / img",
                "model file (MB)",
            ],
            rows,
            "cost",
            num_from=2,
        )
    ]
    projections = [(s.name, s.cost.projection) for s in report.models if s.cost.projection]
    if projections:
        prow = [
            [
                name,
                f"{p.volume_images_per_night:,}",
                _num(p.hours_per_night, 2),
                _num(p.device_hours_per_night, 2),
                f"{_num(p.price_per_night, 2)} {p.currency}",
                f"{_num(p.price_per_month, 2)} {p.currency}",
            ]
            for name, p in projections
            if p is not None
        ]
        out += [
            "<h3>Projection for the stated nightly volume</h3>",
            _table(
                [
                    "model",
                    "images / night",
                    "wall hours / night (one worker)",
                    "device hours / night",
                    "price / night",
                    "price / month (30 nights)",
                ],
                prow,
                "projection",
            ),
        ]
    else:
        out.append(_note("No cost projection (no nightly volume stated)."))
    return out


def _learning_curves(report: Report) -> list[str]:
    lc = report.learning_curves
    caption = "Headline metric against labelled images in the index, per model, with the CI band"
    if lc is None:
        return [
            _note(
                f"{caption}: not drawn — no learning curves in this report.",
                "fig-learning-curves-note",
            )
        ]
    may_change = {True: "yes", False: "no", None: "unknown"}[lc.verdict_may_change]
    sizes = ", ".join(str(size) for size in lc.sizes) or "–"
    facts = [
        f"more labels would likely change the winner: {may_change}",
        f"sizes per class: {sizes}",
        f"{lc.repeats} repeats, seed {lc.seed}; {lc.interval}; computed in {lc.seconds:.1f} s",
    ]
    out = [
        f"<p>{e(lc.statement)}</p>",
        f'<p class="facts">{e(" · ".join(facts))}</p>',
        _figure("fig-learning-curves", caption, lambda: figures.learning_curves(lc)),
    ]
    rows = []
    for curve in lc.curves:
        flat = {True: "flattened", False: "still rising", None: "–"}[curve.flattened]
        for p in curve.points:
            ci = (
                f" [{p.ci_low:.3f}, {p.ci_high:.3f}]"
                if p.ci_low is not None and p.ci_high is not None
                else ""
            )
            rows.append(
                [
                    curve.model,
                    "all" if p.per_class is None else str(p.per_class),
                    f"{p.candidates:.1f}",
                    _num(p.value) + (ci if p.value is not None else ""),
                    str(p.repeats),
                    flat,
                ]
            )
    if rows:
        out.append(
            "<details><summary>Learning-curve points</summary>"
            + _table(
                ["model", "per class", "images in index", lc.metric, "repeats", "last step"],
                rows,
                "curves",
            )
            + "</details>"
        )
    return out


def _confusions(report: Report) -> list[str]:
    hk = report.protocol.headline_k
    out = []
    for i, s in enumerate(report.models):
        fig_id = f"fig-confusion-{i}"
        m = _headline(s, hk)
        caption = (
            f"{s.name}: confusion matrix of MV@{m.k if m else hk} (rows true, columns predicted)"
        )
        if m is None or m.classification is None:
            out.append(_note(f"{caption}: not drawn — not scored.", f"{fig_id}-note"))
            continue
        cm, title = m.classification.confusion, f"{s.name} — MV@{m.k}"
        out.append(_figure(fig_id, caption, partial(figures.confusion, cm, title, fig_id)))
    return out or [_note("No model in this report.")]


def _per_class_f1(report: Report) -> list[str]:
    hk = report.protocol.headline_k
    data = []
    for s in report.models:
        m = _headline(s, hk)
        if m is not None and m.classification is not None:
            data.append((s.name, m.classification.per_class))
    caption = f"Per-class F1 of MV@{hk}, one bar per model"
    out = [
        _figure(
            "fig-per-class-f1",
            caption,
            lambda: figures.per_class_f1(data, caption, "fig-per-class-f1"),
        )
    ]
    rows = []
    for name, pcs in data:
        for pc in pcs:
            rows.append(
                [
                    name,
                    pc.label,
                    f"{pc.precision:.3f}",
                    f"{pc.recall:.3f}",
                    f"{pc.f1:.3f}",
                    pc.support,
                ]
            )
    if rows:
        out.append(
            "<details><summary>Per-class precision, recall, F1 and support</summary>"
            + _table(["model", "class", "precision", "recall", "F1", "support"], rows, num_from=2)
            + "</details>"
        )
    return out


def _trend(report: Report) -> list[str]:
    tr = report.trend
    caption = "Headline metric per night, oldest first"
    if tr is None:
        return [_note(f"{caption}: not drawn — no trend in this report.", "fig-trend-note")]
    facts = f"series {tr.series!r}, metric {tr.metric}, last {tr.window} nights; rule: {tr.rule}"
    out = [f'<p class="facts">{e(facts)}</p>']
    if tr.regressions:
        out.append(
            f'<p class="alert">{e("Regression flagged tonight: " + ", ".join(tr.regressions))}</p>'
        )
    out.append(_figure("fig-trend", caption, lambda: figures.trend(tr)))
    if tr.models:
        out.append(
            "<ul>"
            + "".join(
                "<li>"
                + ("<strong>regression</strong> " if mt.regression else "")
                + f"{e(mt.statement)}</li>"
                for mt in tr.models
            )
            + "</ul>"
        )
    return out


def _metrics(report: Report) -> list[str]:
    hk = report.protocol.headline_k
    rows = []
    for s in report.models:
        m1, mk = _at(s, 1), _at(s, hk)
        rows.append(
            [
                s.name,
                s.family,
                s.weights if s.pretrained else "none (random init)",
                s.embedding_dim,
                _est(m1.mv_accuracy if m1 else None),
                _est(mk.mv_accuracy if mk else None),
                _est(mk.mv_macro_f1 if mk else None),
                _est(mk.acc_at_k if mk else None),
                _est(mk.map_at_k if mk else None),
            ]
        )
    out = [
        _table(
            [
                "model",
                "family",
                "weights",
                "dim",
                "MV@1 acc",
                f"MV@{hk} acc",
                f"MV@{hk} macro-F1",
                f"acc@{hk}",
                f"mAP@{hk}",
            ],
            rows,
            "metrics",
            num_from=3,
        )
    ]
    for s in report.models:
        r = s.retrieval
        facts = [
            f"source {s.source}",
            f"architecture {s.architecture}",
            f"{s.images_encoded} images encoded",
            f"parity min cosine {_num(s.parity_min_cosine, 6)}",
        ]
        out.append(f"<h3>{e(s.name)}</h3>")
        out.append(f'<p class="facts">{e(" · ".join(facts))}</p>')
        if s.encode_failures:
            items = "".join(
                f"<li><code>{e(k)}</code> — {e(reason)}</li>"
                for k, reason in s.encode_failures[:20]
            )
            more = len(s.encode_failures) - 20
            out.append(
                f"<details><summary>{len(s.encode_failures)} images not encoded</summary>"
                f"<ul>{items}</ul>{_note(f'… {more} more') if more > 0 else ''}</details>"
            )
        if r is None:
            out.append(_note("not scored"))
            continue
        groups = "no" if r.n_groups is None else str(r.n_groups)
        scored = (
            f"{r.n_queries} queries ({r.protocol}), {r.n_candidates} candidates, {groups} groups; "
            f"{r.n_queries_without_relevant} queries without a relevant candidate "
            "(left out of mAP)"
        )
        out.append(f'<p class="facts">{e(scored)}</p>')
        out.append(
            _table(
                ["k", "acc@k", "MV@k accuracy", "MV@k macro-F1", "MV@k weighted-F1", "mAP@k"],
                [
                    [
                        m.k,
                        _est(m.acc_at_k),
                        _est(m.mv_accuracy),
                        _est(m.mv_macro_f1),
                        _num(m.mv_weighted_f1),
                        _est(m.map_at_k),
                    ]
                    for m in r.metrics
                ],
                num_from=0,
            )
        )
        if r.warnings:
            out.append("<ul>" + "".join(f"<li>{e(w)}</li>" for w in r.warnings) + "</ul>")
    return out


def _comparisons(report: Report) -> list[str]:
    out = []
    if report.verdicts:
        out.append("<ul>" + "".join(f"<li>{e(v)}</li>" for v in report.verdicts) + "</ul>")
    if report.comparisons:
        rows = []
        for pair in report.comparisons:
            for d in pair.differences:
                ci = (
                    f"{d.difference:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"
                    if d.difference is not None and d.ci_low is not None and d.ci_high is not None
                    else _num(d.difference)
                )
                rows.append(
                    [
                        pair.name_a,
                        pair.name_b,
                        d.metric,
                        _num(d.value_a),
                        _num(d.value_b),
                        ci,
                        format(d.mcnemar_p, ".2g") if d.mcnemar_p is not None else "",
                    ]
                )
        out.append(
            "<details><summary>Paired differences (A − B), every headline metric and k</summary>"
            + _table(
                ["A", "B", "metric", "A", "B", "A − B [95% CI]", "McNemar p"],
                rows,
                "differences",
                num_from=3,
            )
            + "</details>"
        )
        for pair in report.comparisons:
            if pair.warnings:
                out.append(
                    "<ul>"
                    + "".join(
                        f"<li>{e(pair.name_a)} vs {e(pair.name_b)}: {e(w)}</li>"
                        for w in pair.warnings
                    )
                    + "</ul>"
                )
    return out or [_note("No pair of scored models to compare.")]


def _ann(report: Report) -> list[str]:
    checks = [(s.name, s.ann_check) for s in report.models if s.ann_check is not None]
    if not checks:
        return [_note("No ANN check in this report.")]
    rows, notes = [], []
    for name, a in checks:
        assert a is not None
        idx = a.index or {}
        if idx.get("index") == "hnsw":
            desc = f"HNSW m={idx.get('hnsw_m')}, ef_construct={idx.get('hnsw_ef_construct')}"
        else:
            desc = str(idx.get("index", "–"))
        rows.append(
            [
                name,
                a.status,
                a.n_queries,
                "–" if a.recall_at_k is None else f"{a.recall_at_k:.3f} @{a.k}",
                _num(a.recall_min),
                _num(a.latency_ms_p50, 2),
                _num(a.latency_ms_p95, 2),
                desc,
                idx.get("points_count", "–"),
            ]
        )
        if a.reason or a.scope:
            notes.append(f"{name}: {a.reason or a.scope}")
    return [
        _table(
            [
                "model",
                "status",
                "queries",
                "recall@k",
                "min recall",
                "p50 ms",
                "p95 ms",
                "index",
                "points",
            ],
            rows,
            num_from=2,
        ),
        "<ul>"
        + "".join(
            f"<li>{e(n)}</li>"
            for n in [*notes, checks[0][1].match_rule if checks[0][1] else ""]
            if n
        )
        + "</ul>",
    ]


def _leakage(report: Report) -> list[str]:
    if not report.leakage:
        return [_note("No trained model with a recorded training set: nothing to check.")]
    rows = [
        [lk.model, lk.training_images, lk.overlap_queries, lk.overlap_candidates]
        for lk in report.leakage
    ]
    return [
        _table(
            [
                "model",
                "training images",
                "queries it was trained on (excluded)",
                "index images it was trained on (allowed)",
            ],
            rows,
            "leakage",
        )
    ]


def _batch(report: Report) -> list[str]:
    b = report.batch
    facts = (
        f"{b.n_accepted} images accepted of {b.n_listed} listed from {b.source}"
        + (f" (manifest {b.manifest})" if b.manifest else "")
        + f"; {b.n_quarantined} quarantined, {b.n_duplicates} duplicates recorded once; "
        f"labels from {b.label_source}; {len(b.classes)} classes"
    )
    out = [f"<p>{e(facts)}</p>"]
    if b.classes:
        out.append(
            "<details><summary>Classes</summary><p>"
            + ", ".join(f"<code>{e(c)}</code>" for c in b.classes)
            + "</p></details>"
        )
    if b.quarantine_reasons:
        out.append(
            _table(["quarantine reason", "images"], sorted(b.quarantine_reasons.items()), "reasons")
        )
    if b.quarantine:
        rows = [[q.get("key") or "–", q.get("reason") or "–"] for q in b.quarantine]
        out.append(
            f"<details><summary>Quarantined images ({len(b.quarantine)} listed)</summary>"
            + _table(["key", "reason"], rows, "quarantine", num_from=2)
            + "</details>"
        )
    return out


def _failed_chunks(report: Report) -> list[str]:
    if not report.failed_chunks:
        return [_note("No chunk failed.")]
    return [
        _table(
            ["model", "chunk", "task", "reason"],
            [[f.model, f.chunk, f.task, f.reason] for f in report.failed_chunks],
            "failed",
            num_from=1,
        )
    ]


def _warnings(report: Report) -> list[str]:
    if not report.warnings:
        return [_note("No warnings.")]
    return [
        '<ul class="warnings">' + "".join(f"<li>{e(w)}</li>" for w in report.warnings) + "</ul>"
    ]


def _protocol(report: Report) -> list[str]:
    p = report.protocol
    items = [
        f"{p.name} (asked: {p.requested}); "
        f"excluded from a query's candidates: {p.exclusion or '–'}",
        f"{p.n_images} images evaluated, {p.n_queries} queries, {p.n_candidates} candidates"
        + (f"; {p.n_left_out} images not encoded by every model left out" if p.n_left_out else ""),
        f"k = {', '.join(str(k) for k in p.ks)} (headline MV@{p.headline_k}); "
        f"{round(p.confidence * 100)}% bootstrap intervals, {p.bootstrap_resamples} "
        f"resamples, seed {p.seed}",
        f"tie rule: {p.ordering}",
    ]
    if p.search is not None:
        items.append(f"search: {p.search.statement}")
    if p.split is not None:
        s = p.split
        counts = ", ".join(
            f"{k}: {v} images / {s.units.get(k, 0)} units" for k, v in s.images.items()
        )
        items.append(
            f"split: queries = split {s.query_split}; splits from {s.source} ({counts})"
            + (f"; rule: {s.rule}" if s.source == "hash" else "")
            + (f"; test_fraction {s.test_fraction}" if s.test_fraction is not None else "")
        )
    if p.history is not None:
        h = p.history
        items.append(
            f"cross-batch history ({'found in the store' if h.discovered else 'as given'}): "
            f"{', '.join(h.batches) or 'none'}; {h.n_images} candidate images, "
            f"{h.n_same_as_query_batch} images also in this batch removed, {h.n_repeated} repeats "
            "kept once"
        )
    if p.query_sample is not None:
        q = p.query_sample
        per_class = ", ".join(f"{c}: {n}" for c, n in q.per_class.items())
        items.append(
            f"query sample: {q.size} of {q.population} queries (asked {q.requested}, "
            f"seed {q.seed}; {per_class})"
        )
    if p.ann_check_queries:
        items.append(f"ANN check: {p.ann_check_queries} queries per model")
    items.append(f"definitions of every metric: {p.definitions}")
    return ["<ul>" + "".join(f"<li>{e(i)}</li>" for i in items) + "</ul>"]


CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde1e8; --bg: #ffffff; --accent: #1f5fbf;
  --ok: #1a7f37; --bad: #c0262d; --warn: #9a6700; --soft: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 20px 64px; }
h1 { font-size: 1.45rem; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 1.15rem; margin: 36px 0 10px; padding-bottom: 4px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 20px 0 6px; overflow-wrap: anywhere; }
p, li { overflow-wrap: anywhere; }
.meta, .facts, .note, .detail, figcaption { color: var(--muted); font-size: 0.9rem; }
.note { font-style: italic; }
.decision { font-size: 1.2rem; font-weight: 600; padding: 14px 18px; margin: 16px 0 6px;
  border-left: 5px solid var(--accent); background: #eef4fd; border-radius: 4px; }
.decision.none { border-left-color: var(--muted); background: var(--soft); }
.alert { color: var(--bad); font-weight: 600; }
nav { font-size: 0.88rem; margin: 10px 0 0; }
nav a { color: var(--accent); text-decoration: none; margin-right: 12px; white-space: nowrap; }
figure { margin: 12px 0; }
figure svg { max-width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.86rem; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 9px; text-align: left;
  vertical-align: top; max-width: 28em; overflow-wrap: anywhere; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
code { font-size: 0.9em; background: var(--soft); padding: 0 3px; border-radius: 3px; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--accent); }
.badge { display: inline-block; font-size: 0.78rem; font-weight: 600; padding: 0 7px;
  border-radius: 9px; color: #fff; background: var(--muted); }
.badge.better, .badge.non-inferior { background: var(--ok); }
.badge.worse { background: var(--bad); } .badge.inconclusive { background: var(--warn); }
ul.ni li { margin-bottom: 8px; }
ul.warnings li { color: var(--warn); }
footer { margin-top: 40px; color: var(--muted); font-size: 0.8rem; }
@media print { nav, summary { display: none; } details { display: block; }
  main { max-width: none; } }
"""

SECTIONS: list[tuple[str, str, Callable[[Report], list[str]]]] = [
    ("pareto", "Quality against cost", _pareto),
    ("non-inferiority", "Is the cheaper model good enough?", _non_inferiority),
    ("cost", "Cost", _cost),
    ("learning-curves", "Learning curves", _learning_curves),
    ("confusion", "Confusion matrices", _confusions),
    ("per-class", "Per-class F1", _per_class_f1),
    ("trend", "Trend", _trend),
    ("metrics", "Metrics", _metrics),
    ("comparisons", "Comparisons", _comparisons),
    ("ann", "Served index (Qdrant) vs exact search", _ann),
    ("leakage", "Training-set leakage", _leakage),
    ("batch", "Batch and quarantine", _batch),
    ("failed-chunks", "Failed chunks", _failed_chunks),
    ("warnings", "Warnings", _warnings),
    ("protocol", "Protocol", _protocol),
]


def render_html(report: Report) -> str:
    """The whole report as one self-contained HTML page (no scripts, links or external URLs)."""
    b, p = report.batch, report.protocol
    title = f"kiban report — batch {report.batch_id} (version {report.version})"
    meta = (
        f"Created {report.created_at} · {b.n_accepted} images, {len(b.classes)} classes · "
        f"protocol {p.name} · {len(report.models)} models · {_metric_name(report)}"
    )
    nav = " ".join(
        f'<a href="#{sid}">{e(heading)}</a>'
        + (f" ({len(report.warnings)})" if sid == "warnings" and report.warnings else "")
        for sid, heading, _ in SECTIONS
    )
    body = [
        f"<h1>{e(title)}</h1>",
        _decision_line(report),
        f'<p class="meta">{e(meta)}</p>',
        f"<nav>{nav}</nav>",
    ]
    for sid, heading, build in SECTIONS:
        body.append(_section(sid, heading, build(report)))
    footer = (
        f"kiban.report schema version {report.schema_version} · request "
        f"{report.request_id or '–'} · every number on this page is in report.json"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + f"\n<footer>{e(footer)}</footer>\n</main>\n</body>\n</html>\n"
    )


def html_key(report: Report) -> str:
    """Where the page lives in the store, beside report.json and report.md."""
    return f"{report_prefix(report.batch_id)}/{report.version}/report.html"


def write_html(store: ObjectStore, report: Report) -> str:
    """Render and store ``report.html`` beside the report's JSON; returns its key."""
    key = html_key(report)
    store.put(key, render_html(report).encode())
    return key
