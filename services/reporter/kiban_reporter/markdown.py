"""Render the report JSON as Markdown: every number here comes from the JSON document.

Every string that comes from users or their data — batch IDs, sources, model names and cards,
labels, keys, reasons, devices, currencies, and the sentences that quote them (decision,
verdicts, warnings, notes) — goes through ``md_text`` (running text, table cells) or
``md_code`` (inline code), so a label such as ``a|b``, a backtick, ``<script>``,
``[x](http://evil)`` or a line break cannot change a table, add HTML or a link, or start a
new block. See ``docs/report.md``.
"""

from __future__ import annotations

import re

from kiban.text import printable
from kiban_reporter.metrics import Estimate, KMetrics, PairComparison
from kiban_reporter.report import ModelSection, Report

_ALWAYS = frozenset("\\`*|$~")  # escaped wherever they are (\$ and ~: math, strikethrough)
_ENTITY = re.compile(r"#?[A-Za-z0-9]+;")
_SHORTCODE = re.compile(r"[A-Za-z0-9_+-]+:")
_LIST_START = re.compile(r"(\d{1,9})([.)])")


def md_text(value: object) -> str:
    """``value`` as literal Markdown text, safe in a table cell, a list item or a heading.

    Always escaped: ``\\ ` * | $ ~``; the rest only where it would mean something:
    ``_`` unless inside a word, ``[`` at the start or before ``^`` (task box, footnote),
    ``]`` before ``(``, ``[`` or ``:`` (link, reference, definition), ``<`` before a letter,
    ``/``, ``!`` or ``?`` (HTML, autolink), ``&`` of an entity, ``:`` of an emoji shortcode,
    a block marker at the start (``#``, ``>``, ``-``, ``+``, ``1.``). Control characters are
    shown escaped first (``kiban.text.printable``), so no line break reaches the document.
    """
    text = printable(value)
    out: list[str] = []
    n = len(text)
    for i, ch in enumerate(text):
        prev = text[i - 1] if i else ""
        nxt = text[i + 1] if i + 1 < n else ""
        if ch in _ALWAYS:
            out.append("\\" + ch)
        elif ch == "_":
            out.append("_" if prev.isalnum() and nxt.isalnum() else "\\_")
        elif ch == "[":
            out.append("\\[" if i == 0 or nxt == "^" else ch)
        elif ch == "]":
            out.append("\\]" if nxt and nxt in "([:" else ch)
        elif ch == "<":
            out.append("&lt;" if nxt and (nxt.isalpha() or nxt in "/!?") else ch)
        elif ch == ">":
            out.append("&gt;" if i == 0 else ch)
        elif ch == "&":
            out.append("&amp;" if _ENTITY.match(text, i + 1) else ch)
        elif ch == ":":
            out.append("\\:" if _SHORTCODE.match(text, i + 1) else ch)
        elif i == 0 and ch in "#-+=":
            out.append("\\" + ch)
        else:
            out.append(ch)
    escaped = "".join(out)
    return _LIST_START.sub(r"\1\\\2", escaped, count=1) if _LIST_START.match(escaped) else escaped


def md_code(value: object, cell: bool = False) -> str:
    """``value`` as inline code: a fence longer than any backtick run inside, padded when the
    text starts or ends with a backtick or a space; ``cell``: pipes escaped for a table."""
    text = printable(value)
    if not text:
        return "` `"
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    if cell:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


_t, _c = md_text, md_code


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
    cur = _t(report.models[0].cost.currency) if report.models else ""
    lines = [
        f"| model | family | weights | dim | params (M) | GMACs / img | MV@1 acc | MV@{hk} acc | "
        f"MV@{hk} macro-F1 | acc@{hk} | mAP@{hk} | img/s | s / 1k img | {cur} / 1k img | "
        "bytes / vector |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.models:
        m1, mk = _at(s, 1), _at(s, hk)
        c = s.cost
        weights = _t(s.weights) if s.pretrained else "none (random init)"
        lines.append(
            f"| **{_t(s.name)}** | {_t(s.family)} | {weights} | {s.embedding_dim} "
            f"| {s.params / 1e6:.1f} "
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
        f"### {_t(s.name)}",
        "",
        f"- source {_c(s.source)}, architecture {_t(s.architecture)}, weights: {_t(s.weights)}",
        f"- {s.images_encoded} images encoded on {_t(c.provider)} ({_t(c.device)}, "
        f"threads={c.threads},"
        f" batch={c.batch_size}): {_num(c.encode_images_per_second, 1)} img/s end to end, "
        f"{_num(c.inference_images_per_second, 1)} img/s inference only",
        f"- parity with the source model: min cosine {_num(s.parity_min_cosine, 6)}",
    ]
    for key, reason in s.encode_failures[:20]:
        out.append(f"- not encoded: {_c(key)} — {_t(reason)}")
    if s.retrieval is None:
        return [*out, "", "_not scored_", ""]
    r = s.retrieval
    out += [
        f"- {r.n_queries} queries ({_t(r.protocol)}), {r.n_candidates} candidates, "
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
                f"| {_t(pc.label)} | {pc.precision:.3f} | {pc.recall:.3f} "
                f"| {pc.f1:.3f} | {pc.support} |"
            )
        labels = [_t(label) for label in cls.confusion.labels]
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
        f"- **{_t(p.name)}** (asked: {_t(p.requested)}); excluded from a query's candidates: "
        f"{_t(p.exclusion) if p.exclusion else '–'}",
        f"- {p.n_images} images evaluated, {p.n_queries} queries, {p.n_candidates} candidates"
        + (f"; {p.n_left_out} images not encoded by every model left out" if p.n_left_out else ""),
        f"- k = {', '.join(str(k) for k in p.ks)} (headline MV@{p.headline_k}); "
        f"{round(p.confidence * 100)}% bootstrap intervals, {p.bootstrap_resamples} resamples, "
        f"seed {p.seed}",
        f"- tie rule: {_t(p.ordering)}",
    ]
    if p.search is not None:
        out.append(f"- search: {_t(p.search.statement)}")
    if p.split is not None:
        s = p.split
        counts = ", ".join(
            f"{_t(k)}: {v} images / {s.units.get(k, 0)} units" for k, v in s.images.items()
        )
        out.append(
            f"- split: queries = split {_c(s.query_split)}; splits from {_t(s.source)} ({counts})"
            + (f"; rule: {_t(s.rule)}" if s.source == "hash" else "")
            + (f"; test_fraction {s.test_fraction}" if s.test_fraction is not None else "")
        )
    if p.history is not None:
        h = p.history
        out.append(
            f"- cross-batch history ({'found in the store' if h.discovered else 'as given'}): "
            f"{', '.join(_c(b) for b in h.batches) or 'none'}; {h.n_images} candidate images, "
            f"{h.n_same_as_query_batch} images also in this batch removed, {h.n_repeated} repeats "
            "kept once"
        )
    if p.query_sample is not None:
        q = p.query_sample
        per_class = ", ".join(f"{_t(c)}: {n}" for c, n in q.per_class.items())
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
            desc = _t(idx.get("index", "–"))
        out.append(
            f"| {_t(name)} | {_t(a.status)} | {a.n_queries} | "
            f"{'–' if a.recall_at_k is None else f'{a.recall_at_k:.3f} @{a.k}'} "
            f"| {_num(a.recall_min)} | {_num(a.latency_ms_p50, 2)} | {_num(a.latency_ms_p95, 2)} "
            f"| {desc} | {_t(idx.get('points_count', '–'))} |"
        )
        if a.reason:
            notes.append(f"- {_t(name)}: {_t(a.reason)}")
        elif a.scope:
            notes.append(f"- {_t(name)}: {_t(a.scope)}")
    rule = checks[0][1].match_rule
    return [*out, "", *notes, f"- {_t(rule)}", ""]


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
                f"| {_t(pair.name_a)} | {_t(pair.name_b)} | {_t(d.metric)} "
                f"| {_num(d.value_a)} | {_num(d.value_b)} | {ci} "
                f"| {format(d.mcnemar_p, '.2g') if d.mcnemar_p is not None else ''} |"
            )
    return [*out, ""]


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _decision_line(report: Report) -> str:
    if report.decision is None:
        return "**Decision:** none — the batch was not scored (see warnings)."
    return f"**Decision:** {_t(report.decision.line)}"


def _decision_section(report: Report) -> list[str]:
    d = report.decision
    if d is None:
        return []
    unit = f"{_t(d.currency)} / 1k img" if d.cost_basis == "price per 1k images" else "s / 1k img"
    digits = 4 if d.cost_basis == "price per 1k images" else 1
    out = [
        "## Decision",
        "",
        f"**{_t(d.line)}**",
        "",
        f"Quality: {_t(d.metric)} (point estimate, 95% CI); cost: {_t(d.cost_basis)}; "
        f"non-inferiority margin δ = {d.margin:g}.",
        "",
        f"| model | {_t(d.metric)} | {unit} | on the Pareto front | dominated by |",
        "|---|---|---|---|---|",
    ]
    for pt in d.pareto:
        q = (
            "–"
            if pt.quality is None
            else f"{pt.quality:.3f}"
            + (
                f" [{pt.quality_ci_low:.3f}, {pt.quality_ci_high:.3f}]"
                if pt.quality_ci_low is not None and pt.quality_ci_high is not None
                else ""
            )
        )
        out.append(
            f"| {_t(pt.model)} | {q} | {_num(pt.cost, digits)} | {'yes' if pt.on_front else 'no'} "
            f"| {', '.join(_t(m) for m in pt.dominated_by) or '–'} |"
        )
    if d.non_inferiority:
        out += ["", "Cheaper model against dearer model (paired CI of cheaper − dearer):", ""]
        out += [f"- **{_t(n.outcome)}**: {_t(n.statement)}" for n in d.non_inferiority]
    if d.notes:
        out += ["", *(f"- {_t(note)}" for note in d.notes)]
    return [*out, ""]


def _cost_section(report: Report) -> list[str]:
    if not report.models:
        return []
    cur = _t(report.models[0].cost.currency)
    out = [
        "## Cost",
        "",
        "Measured by the encoder on its own hardware (the device column); device-seconds are "
        "core-seconds (wall × cores) on a CPU, GPU-seconds (wall) on a GPU.",
        "",
        "| model | device | provider | cores | batch | p50 s / batch | img/s | s / 1k img "
        f"| device-s / 1k img | {cur} / 1k img | storage / 1M img |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    projections = []
    for s in report.models:
        c = s.cost
        out.append(
            f"| {_t(s.name)} | {_t(c.device)} | {_t(c.provider)} | {c.cores if c.cores else '–'} "
            f"| {c.batch_size} | {_num(c.p50_batch_seconds, 3)} "
            f"| {_num(c.encode_images_per_second, 1)} | {_num(c.seconds_per_1k, 1)} "
            f"| {_num(c.device_seconds_per_1k, 1)}"
            f"{' ' + _t(c.device_seconds_unit) if c.device_seconds_per_1k is not None else ''} "
            f"| {_num(c.cost_per_1k, 4)} | {_bytes(c.storage_bytes_per_million)} |"
        )
        if c.projection is not None:
            projections.append((s.name, c))
    out += [
        "",
        "Storage per million images = 10⁶ × (4 bytes × dim + HNSW links 4 × (32 + 16/15) bytes "
        "(Qdrant's default m = 16) + the mean payload per point).",
    ]
    if projections:
        vol = projections[0][1].projection
        assert vol is not None
        out += [
            "",
            f"Projection for {vol.volume_images_per_night:,} images a night (one worker like "
            "the one that ran; a month = 30 nights):",
            "",
            f"| model | hours / night | device-hours / night | {cur} / night | {cur} / month |",
            "|---|---|---|---|---|",
        ]
        for name, c in projections:
            pr = c.projection
            assert pr is not None
            out.append(
                f"| {_t(name)} | {_num(pr.hours_per_night, 2)} "
                f"| {_num(pr.device_hours_per_night, 2)} "
                f"| {_num(pr.price_per_night, 2)} | {_num(pr.price_per_month, 2)} |"
            )
    if any(s.cost.mixed_devices for s in report.models):
        out += [
            "",
            *(
                f"- {_t(s.name)}: **mixed devices** — its shards came from {_t(s.cost.device)} "
                f"({_t(s.cost.provider)}); the throughput is a mix"
                for s in report.models
                if s.cost.mixed_devices
            ),
        ]
    return [*out, ""]


def _leakage_section(report: Report) -> list[str]:
    if not report.leakage:
        return []
    out = [
        "## Leakage check",
        "",
        "Images a model kiban trained was trained on (by sha256) are removed from the queries "
        "of every model; as candidates (the searched index) they are allowed and counted.",
        "",
        "| model | training images | queries trained on (excluded) | candidates trained on |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {_t(c.model)} | {c.training_images} | {c.overlap_queries} | {c.overlap_candidates} |"
        for c in report.leakage
    ]
    return [*out, ""]


def _curve_cell(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "–"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _learning_curve_section(report: Report) -> list[str]:
    lc = report.learning_curves
    if lc is None or not lc.curves:
        return []
    sizes = [p.per_class for p in lc.curves[0].points]
    heads = ["all" if n is None else f"≤{n}/class" for n in sizes]
    out = [
        "## Is the labelled set big enough?",
        "",
        _t(lc.statement),
        "",
        f"{_t(lc.metric)} with at most N labelled images per class in the index ({lc.repeats} "
        f"seeded subsets per point, seed {lc.seed}; queries fixed). {_t(lc.interval)}",
        "",
        "| model | " + " | ".join(heads) + " | flattened |",
        "|---" * (len(heads) + 2) + "|",
    ]
    for c in lc.curves:
        cells = [_curve_cell(p.value, p.ci_low, p.ci_high) for p in c.points]
        flat = {True: "yes", False: "no", None: "unclear"}[c.flattened]
        out.append(f"| {_t(c.model)} | " + " | ".join(cells) + f" | {flat} |")
    return [*out, ""]


def _trend_section(report: Report) -> list[str]:
    tr = report.trend
    if tr is None or not tr.models:
        return []
    out = [
        f"## Trend — series {_c(tr.series)}",
        "",
        f"{_t(tr.metric)} over the last {tr.window} batches of the series. Rule: {_t(tr.rule)}",
        "",
        "| model | batches | baseline | tonight | regression |",
        "|---|---|---|---|---|",
    ]
    for m in tr.models:
        last = m.points[-1] if m.points else None
        tonight = _curve_cell(last.value, last.ci_low, last.ci_high) if last else "–"
        out.append(
            f"| {_t(m.model)} | {len(m.points)} | {_num(m.baseline)} | {tonight} | "
            f"{'**yes**' if m.regression else 'no'} |"
        )
    out += ["", *(f"- {_t(m.statement)}" for m in tr.models)]
    out += [f"- {_t(n)}" for n in tr.notes]
    return [*out, ""]


def render_markdown(report: Report) -> str:
    b, p = report.batch, report.protocol
    lines = [
        f"# kiban report — batch {_c(report.batch_id)} (version {_t(report.version)})",
        "",
        _decision_line(report),
        "",
        f"{b.n_accepted} images accepted from {_c(b.source)} ({b.n_quarantined} quarantined, "
        f"{b.n_duplicates} duplicates recorded once); labels from {_t(b.label_source)}; "
        f"{len(b.classes)} classes. Protocol: **{_t(p.name)}**, exact search, "
        f"{round(p.confidence * 100)}% bootstrap CIs ({p.bootstrap_resamples} resamples, "
        f"seed {p.seed}). Created {_t(report.created_at)}.",
        "",
        *_protocol_section(report),
        *_leakage_section(report),
        "## Comparison",
        "",
        *_summary_table(report),
        "",
        *_decision_section(report),
        *_cost_section(report),
        *_learning_curve_section(report),
        *_trend_section(report),
    ]
    if report.verdicts:
        lines += ["## Verdicts", "", *(f"- {_t(v)}" for v in report.verdicts), ""]
    if report.comparisons:
        lines += _differences_table(report.comparisons)
    lines += _ann_section(report)
    lines += ["## Models", ""]
    for s in report.models:
        lines += _model_detail(s, p.headline_k)
    if b.quarantine:
        lines += ["## Quarantine", "", "| key | reason |", "|---|---|"]
        lines += [
            f"| {_c(q.get('key', ''), cell=True)} | {_t(q.get('reason', ''))} |"
            for q in b.quarantine
        ]
        lines.append("")
    if b.label_conflicts:
        lines += [
            f"## Label conflicts ({b.n_label_conflicts})",
            "",
            "Byte-identical images under keys with different labels: the record keeps the label "
            "of its first key (code-point order).",
            "",
            "| kept key | kept label | dropped (key = label) |",
            "|---|---|---|",
        ]
        lines += [
            f"| {_c(c.kept.key, cell=True)} | {_t(c.kept.label)} | "
            + ", ".join(f"{_c(d.key, cell=True)} = {_t(d.label)}" for d in c.dropped)
            + " |"
            for c in b.label_conflicts
        ]
        lines.append("")
    if report.failed_chunks:
        lines += ["## Failed chunks", "", "| model | chunk | task | reason |", "|---|---|---|---|"]
        lines += [
            f"| {_t(f.model)} | {f.chunk} | {_t(f.task)} | {_t(f.reason)} |"
            for f in report.failed_chunks
        ]
        lines.append("")
    if report.warnings:
        lines += ["## Warnings", "", *(f"- {_t(w)}" for w in report.warnings), ""]
    lines += [f"Definitions of every metric: {p.definitions}.", ""]
    return "\n".join(lines)
