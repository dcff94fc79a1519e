"""Render the report JSON as Markdown: every number here comes from the JSON document."""

from __future__ import annotations

from kiban_reporter.metrics import Estimate, KMetrics, PairComparison
from kiban_reporter.report import ModelSection, Report


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _est(est: Estimate | None) -> str:
    if est is None or est.value is None:
        return "–"
    if est.ci_low is None:
        return f"{est.value:.3f}"
    return f"{est.value:.3f} [{est.ci_low:.3f}, {est.ci_high:.3f}]"


def _at(section: ModelSection, k: int) -> KMetrics | None:
    if section.retrieval is None:
        return None
    return next((m for m in section.retrieval.metrics if m.k == k), None)


def _summary_table(report: Report) -> list[str]:
    hk = report.protocol.headline_k
    cur = report.models[0].cost.currency if report.models else ""
    lines = [
        f"| model | family | weights | dim | params (M) | GMACs / img | MV@1 acc | MV@{hk} acc | "
        f"MV@{hk} macro-F1 | acc@{hk} | mAP@{hk} | img/s | s / 1k img | {cur} / 1k img | "
        "bytes / vector |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.models:
        m1, mk = _at(s, 1), _at(s, hk)
        c = s.cost
        weights = s.weights if s.pretrained else "none (random init)"
        lines.append(
            f"| **{s.name}** | {s.family} | {weights} | {s.embedding_dim} | {s.params / 1e6:.1f} "
            f"| {_num(c.macs_per_image / 1e9 if c.macs_per_image else None, 2)} "
            f"| {_est(m1.mv_accuracy if m1 else None)} "
            f"| {_est(mk.mv_accuracy if mk else None)} "
            f"| {_est(mk.mv_macro_f1 if mk else None)} | {_est(mk.acc_at_k if mk else None)} "
            f"| {_est(mk.map_at_k if mk else None)} | {_num(c.encode_images_per_second, 1)} "
            f"| {_num(c.seconds_per_1k, 1)} | {_num(c.cost_per_1k, 4)} | {c.bytes_per_vector} |"
        )
    return lines


def _model_detail(s: ModelSection, hk: int) -> list[str]:
    c = s.cost
    out = [
        f"### {s.name}",
        "",
        f"- source `{s.source}`, architecture {s.architecture}, weights: {s.weights}",
        f"- {s.images_encoded} images encoded on {c.provider} ({c.device}, threads={c.threads},"
        f" batch={c.batch_size}): {_num(c.encode_images_per_second, 1)} img/s end to end, "
        f"{_num(c.inference_images_per_second, 1)} img/s inference only",
        f"- parity with the source model: min cosine {_num(s.parity_min_cosine, 6)}",
    ]
    for key, reason in s.encode_failures[:20]:
        out.append(f"- not encoded: `{key}` — {reason}")
    if s.retrieval is None:
        return [*out, "", "_not scored_", ""]
    r = s.retrieval
    out += [
        f"- {r.n_queries} queries ({r.protocol}), {r.n_candidates} candidates, "
        f"{r.n_groups if r.n_groups is not None else 'no'} groups; "
        f"{r.n_queries_without_relevant} queries without a relevant candidate (left out of mAP)",
        "",
        "| k | acc@k | MV@k accuracy | MV@k macro-F1 | MV@k weighted-F1 | mAP@k |",
        "|---|---|---|---|---|---|",
    ]
    for m in r.metrics:
        out.append(
            f"| {m.k} | {_est(m.acc_at_k)} | {_est(m.mv_accuracy)} "
            f"| {_est(m.mv_macro_f1)} | {_num(m.mv_weighted_f1)} | {_est(m.map_at_k)} |"
        )
    last = next((m for m in r.metrics if m.k == hk), r.metrics[-1])
    cls = last.classification
    if cls is not None:
        out += [
            "",
            f"Per class, MV@{last.k}:",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for pc in cls.per_class:
            out.append(
                f"| {pc.label} | {pc.precision:.3f} | {pc.recall:.3f} "
                f"| {pc.f1:.3f} | {pc.support} |"
            )
        labels = cls.confusion.labels
        out += [
            "",
            f"Confusion matrix, MV@{last.k} (rows: true, columns: predicted):",
            "",
            "| true \\ pred | " + " | ".join(labels) + " |",
            "|---" * (len(labels) + 1) + "|",
        ]
        for label, row in zip(labels, cls.confusion.matrix, strict=True):
            out.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    return [*out, ""]


def _protocol_section(report: Report) -> list[str]:
    p = report.protocol
    out = [
        "## Protocol",
        "",
        f"- **{p.name}** (asked: {p.requested}); excluded from a query's candidates: "
        f"{p.exclusion or '–'}",
        f"- {p.n_images} images evaluated, {p.n_queries} queries, {p.n_candidates} candidates"
        + (f"; {p.n_left_out} images not encoded by every model left out" if p.n_left_out else ""),
        f"- k = {', '.join(str(k) for k in p.ks)} (headline MV@{p.headline_k}); "
        f"{int(p.confidence * 100)}% bootstrap intervals, {p.bootstrap_resamples} resamples, "
        f"seed {p.seed}",
        f"- tie rule: {p.ordering}",
    ]
    if p.split is not None:
        s = p.split
        counts = ", ".join(
            f"{k}: {v} images / {s.units.get(k, 0)} units" for k, v in s.images.items()
        )
        out.append(
            f"- split: queries = split `{s.query_split}`; splits from {s.source} ({counts})"
            + (f"; rule: {s.rule}" if s.source == "hash" else "")
            + (f"; test_fraction {s.test_fraction}" if s.test_fraction is not None else "")
        )
    if p.history is not None:
        h = p.history
        out.append(
            f"- cross-batch history ({'found in the store' if h.discovered else 'as given'}): "
            f"{', '.join(f'`{b}`' for b in h.batches) or 'none'}; {h.n_images} candidate images, "
            f"{h.n_same_as_query_batch} images also in this batch removed, {h.n_repeated} repeats "
            "kept once"
        )
    if p.query_sample is not None:
        q = p.query_sample
        per_class = ", ".join(f"{c}: {n}" for c, n in q.per_class.items())
        out.append(
            f"- query sample: {q.size} of {q.population} queries (asked {q.requested}, "
            f"seed {q.seed}; {per_class})"
        )
    return [*out, ""]


def _ann_section(report: Report) -> list[str]:
    checks = [(s.name, s.ann_check) for s in report.models if s.ann_check is not None]
    if not checks:
        return []
    out = [
        "## Served index (Qdrant) vs exact search",
        "",
        "| model | status | queries | recall@k | min recall | p50 ms | p95 ms | index | points |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, a in checks:
        idx = a.index or {}
        if idx.get("index") == "hnsw":
            desc = f"HNSW m={idx.get('hnsw_m')}, ef_construct={idx.get('hnsw_ef_construct')}"
        else:
            desc = str(idx.get("index", "–"))
        out.append(
            f"| {name} | {a.status} | {a.n_queries} | "
            f"{'–' if a.recall_at_k is None else f'{a.recall_at_k:.3f} @{a.k}'} "
            f"| {_num(a.recall_min)} | {_num(a.latency_ms_p50, 2)} | {_num(a.latency_ms_p95, 2)} "
            f"| {desc} | {idx.get('points_count', '–')} |"
        )
        if a.reason:
            notes.append(f"- {name}: {a.reason}")
        elif a.scope:
            notes.append(f"- {name}: {a.scope}")
    rule = checks[0][1].match_rule
    return [*out, "", *notes, f"- {rule}", ""]


def _differences_table(comparisons: list[PairComparison]) -> list[str]:
    out = [
        "## Paired differences (A − B)",
        "",
        "| A | B | metric | A | B | A − B [95% CI] | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in comparisons:
        for d in pair.differences:
            ci = (
                f"{d.difference:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"
                if d.difference is not None and d.ci_low is not None
                else _num(d.difference)
            )
            out.append(
                f"| {pair.name_a} | {pair.name_b} | {d.metric} "
                f"| {_num(d.value_a)} | {_num(d.value_b)} | {ci} "
                f"| {format(d.mcnemar_p, '.2g') if d.mcnemar_p is not None else ''} |"
            )
    return [*out, ""]


def render_markdown(report: Report) -> str:
    b, p = report.batch, report.protocol
    lines = [
        f"# kiban report — batch `{report.batch_id}` (version {report.version})",
        "",
        f"{b.n_accepted} images accepted from `{b.source}` ({b.n_quarantined} quarantined, "
        f"{b.n_duplicates} duplicates recorded once); labels from {b.label_source}; "
        f"{len(b.classes)} classes. Protocol: **{p.name}**, exact search, "
        f"{int(p.confidence * 100)}% bootstrap CIs ({p.bootstrap_resamples} resamples, "
        f"seed {p.seed}). Created {report.created_at}.",
        "",
        *_protocol_section(report),
        "## Comparison",
        "",
        *_summary_table(report),
        "",
    ]
    if report.verdicts:
        lines += ["## Verdicts", "", *(f"- {v}" for v in report.verdicts), ""]
    if report.comparisons:
        lines += _differences_table(report.comparisons)
    lines += _ann_section(report)
    lines += ["## Models", ""]
    for s in report.models:
        lines += _model_detail(s, p.headline_k)
    if b.quarantine:
        lines += ["## Quarantine", "", "| key | reason |", "|---|---|"]
        lines += [f"| `{q['key']}` | {q['reason']} |" for q in b.quarantine]
        lines.append("")
    if report.failed_chunks:
        lines += ["## Failed chunks", "", "| model | chunk | task | reason |", "|---|---|---|---|"]
        lines += [
            f"| {f.model} | {f.chunk} | {f.task} | {f.reason} |" for f in report.failed_chunks
        ]
        lines.append("")
    if report.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in report.warnings), ""]
    lines += [f"Definitions of every metric: {p.definitions}.", ""]
    return "\n".join(lines)
