"""Render the report JSON as Markdown: every number here comes from the JSON document."""

from __future__ import annotations

from typing import Any

from kiban_reporter.report import ModelSection, Report


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _est(est: dict[str, Any] | None) -> str:
    if not est or est.get("value") is None:
        return "–"
    if est.get("ci_low") is None:
        return f"{est['value']:.3f}"
    return f"{est['value']:.3f} [{est['ci_low']:.3f}, {est['ci_high']:.3f}]"


def _at(section: ModelSection, k: int) -> dict[str, Any] | None:
    if section.retrieval is None:
        return None
    for m in section.retrieval["metrics"]:
        if m["k"] == k:
            return dict(m)
    return None


def _summary_table(report: Report) -> list[str]:
    hk = report.protocol.headline_k
    cur = report.models[0].cost.currency if report.models else ""
    lines = [
        f"| model | family | weights | dim | params (M) | MV@1 acc | MV@{hk} acc | "
        f"MV@{hk} macro-F1 | acc@{hk} | mAP@{hk} | img/s | s / 1k img | {cur} / 1k img | "
        "bytes / vector |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.models:
        m1, mk = _at(s, 1), _at(s, hk)
        c = s.cost
        weights = s.weights if s.pretrained else "none (random init)"
        lines.append(
            f"| **{s.name}** | {s.family} | {weights} | {s.embedding_dim} | {s.params / 1e6:.1f} "
            f"| {_est(m1 and m1['mv_accuracy'])} | {_est(mk and mk['mv_accuracy'])} "
            f"| {_est(mk and mk['mv_macro_f1'])} | {_est(mk and mk['acc_at_k'])} "
            f"| {_est(mk and mk['map_at_k'])} | {_num(c.encode_images_per_second, 1)} "
            f"| {_num(c.seconds_per_1k, 1)} | {_num(c.cost_per_1k, 4)} | {c.bytes_per_vector} |"
        )
    return lines


def _model_detail(s: ModelSection) -> list[str]:
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
        f"- {r['n_queries']} queries ({r['protocol']}), {r['n_candidates']} candidates, "
        f"{r['n_groups'] if r['n_groups'] is not None else 'no'} groups; "
        f"{r['n_queries_without_relevant']} queries without a relevant candidate (left out of mAP)",
        "",
        "| k | acc@k | MV@k accuracy | MV@k macro-F1 | MV@k weighted-F1 | mAP@k |",
        "|---|---|---|---|---|---|",
    ]
    for m in r["metrics"]:
        out.append(
            f"| {m['k']} | {_est(m['acc_at_k'])} | {_est(m['mv_accuracy'])} "
            f"| {_est(m['mv_macro_f1'])} | {_num(m['mv_weighted_f1'])} | {_est(m['map_at_k'])} |"
        )
    last = r["metrics"][-1]
    cls = last.get("classification")
    if cls:
        out += [
            "",
            f"Per class, MV@{last['k']}:",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for pc in cls["per_class"]:
            out.append(
                f"| {pc['label']} | {pc['precision']:.3f} | {pc['recall']:.3f} "
                f"| {pc['f1']:.3f} | {pc['support']} |"
            )
        labels = cls["confusion"]["labels"]
        out += [
            "",
            f"Confusion matrix, MV@{last['k']} (rows: true, columns: predicted):",
            "",
            "| true \\ pred | " + " | ".join(labels) + " |",
            "|---" * (len(labels) + 1) + "|",
        ]
        for label, row in zip(labels, cls["confusion"]["matrix"], strict=True):
            out.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
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
        "## Comparison",
        "",
        *_summary_table(report),
        "",
    ]
    if report.verdicts:
        lines += ["## Verdicts", "", *(f"- {v}" for v in report.verdicts), ""]
    if report.comparisons:
        lines += [
            "## Paired differences (A − B)",
            "",
            "| A | B | metric | A | B | A − B [95% CI] | McNemar p |",
            "|---|---|---|---|---|---|---|",
        ]
        for pair in report.comparisons:
            for d in pair["differences"]:
                ci = (
                    f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                    if d["difference"] is not None and d["ci_low"] is not None
                    else _num(d["difference"])
                )
                lines.append(
                    f"| {pair['name_a']} | {pair['name_b']} | {d['metric']} "
                    f"| {_num(d['value_a'])} | {_num(d['value_b'])} | {ci} "
                    f"| {format(d['mcnemar_p'], '.2g') if d['mcnemar_p'] is not None else ''} |"
                )
        lines.append("")
    lines += ["## Models", ""]
    for s in report.models:
        lines += _model_detail(s)
    if b.quarantine:
        lines += ["## Quarantine", "", "| key | reason |", "|---|---|"]
        lines += [f"| `{q['key']}` | {q['reason']} |" for q in b.quarantine]
        lines.append("")
    if report.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in report.warnings), ""]
    lines += [f"Definitions of every metric: {p.definitions}.", ""]
    return "\n".join(lines)
