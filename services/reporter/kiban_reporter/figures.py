"""The report's figures: matplotlib (Agg canvas, no pyplot), written as SVG for report.html.

Every figure is a pure function of typed report sections and returns one ``<svg>`` element as
a string, ready to inline in the page:

- self-contained: no XML declaration or DOCTYPE, no ``<metadata>`` (matplotlib's points to its
  web site), text kept as ``<text>`` elements (``svg.fonttype = none``: no font files, no
  URLs), so the only URLs left are the SVG and XLink namespace declarations;
- user strings (labels, model names, batch ids) are data: ``text.parse_math`` is off, so
  ``$x^2$`` is drawn as the five characters, never as mathtext, and ``text.usetex`` is off; the
  SVG writer XML-escapes the text;
- element ids are prefixed with the figure id, so several figures in one page never share an
  id (clip paths and markers are referenced by id);
- deterministic: a fixed ``svg.hashsalt`` and no date, so the same report gives the same bytes.

matplotlib is imported on first use, so importing this module (and the reporter worker) stays
cheap. A figure whose input has nothing to draw raises :class:`NoDataError` with a one-line
reason.
"""

from __future__ import annotations

import io
import math
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from kiban_reporter.decision_schema import Decision, LearningCurves, Trend
from kiban_reporter.metrics import ClassMetrics, ConfusionMatrix

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"

# Local to each figure (rc_context): nothing global is changed for other matplotlib users.
RC: dict[str, Any] = {
    "svg.fonttype": "none",  # text as <text>: no embedded glyphs, no font URLs
    "svg.hashsalt": "kiban",  # deterministic clip-path / marker ids
    "svg.image_inline": True,
    "text.parse_math": False,  # user strings are data: "$x^2$" stays "$x^2$"
    "text.usetex": False,
    "axes.formatter.use_mathtext": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # ships with matplotlib: no font lookups, no warnings
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 72,
}
FONT_STACK = "'DejaVu Sans', Verdana, 'Bitstream Vera Sans', sans-serif"
COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
]
LABEL_CHARS = 32  # longer labels are shortened in figures (the tables carry them in full)
MAX_ANNOTATED_CLASSES = 12  # confusion cells carry their count (vector cells) up to this many
RASTER_DPI = 144  # resolution of the rasterised parts (big confusion matrices) only


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class NoDataError(Exception):
    """The figure's input has nothing to draw; the message says why, in one line."""


def short(text: str, n: int = LABEL_CHARS) -> str:
    """A label for a figure: one line, at most ``n`` characters."""
    text = " ".join(_CONTROL.sub("", str(text)).split())  # control characters are not XML
    return text if len(text) <= n else text[: n - 1] + "…"


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(cast(Any, RC)), warnings.catch_warnings():
        # Glyphs missing from DejaVu Sans (CJK, emoji) are drawn by the browser's font anyway.
        warnings.simplefilter("ignore", UserWarning)
        yield


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_URL_REF = re.compile(r"url\(#([^)]+)\)")


def _svg(fig: Figure, fig_id: str) -> str:
    """The figure as one inline ``<svg>`` element (see the module docstring)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, dpi=RASTER_DPI)
    root = ET.fromstring(buf.getvalue())  # the DOCTYPE is dropped by parsing
    for parent in root.iter():
        for child in list(parent):
            if child.tag == f"{{{SVG_NS}}}metadata":
                parent.remove(child)
    prefix = f"{fig_id}-"
    href = f"{{{XLINK_NS}}}href"
    for el in root.iter():
        for name, value in list(el.attrib.items()):
            if name == "id":
                el.set(name, prefix + value)
            elif name in (href, "href") and value.startswith("#"):
                el.set(name, "#" + prefix + value[1:])
            elif "url(#" in value:
                el.set(name, _URL_REF.sub(lambda m: f"url(#{prefix}{m.group(1)})", value))
            if name == "style":
                style = el.get(name, "")
                el.set(
                    name, style.replace("font-family: 'DejaVu Sans'", f"font-family: {FONT_STACK}")
                )
    root.set("id", fig_id + "-svg")
    root.set("role", "img")
    ET.register_namespace("", SVG_NS)
    ET.register_namespace("xlink", XLINK_NS)
    return ET.tostring(root, encoding="unicode")


def _plain_log_axis(ax: Axes, axis: str = "x") -> None:
    """Log-scale ticks as plain numbers (the default formatter writes mathtext)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) >= 2 and max(positive) / min(positive) >= 10


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _f(x: float | None) -> float:
    """A value to plot: NaN (a gap) where undefined."""
    return x if x is not None and math.isfinite(x) else math.nan


def pareto(decision: Decision, fig_id: str = "fig-pareto") -> str:
    """Quality (± CI) against cost per 1k images; the Pareto front joined and filled."""
    points = [p for p in decision.pareto if _finite(p.quality) and _finite(p.cost)]
    if not points:
        raise NoDataError("no model has both a quality and a cost to place on the plane")
    unit = (decision.currency or "") if decision.cost_basis == "price per 1k images" else "s"
    costs = [_f(p.cost) for p in points]
    log_x = _spans_decades(costs)
    with _style():
        fig = _figure(6.4, 4.0)
        ax = fig.add_subplot()
        front = sorted((p for p in points if p.on_front), key=lambda p: p.cost or 0.0)
        if len(front) > 1:
            ax.step(
                [_f(p.cost) for p in front],
                [_f(p.quality) for p in front],
                where="post",
                color="#2ca02c",
                alpha=0.6,
                linewidth=1.5,
                zorder=1,
            )
        for i, p in enumerate(points):
            x, y = _f(p.cost), _f(p.quality)
            lo = y - _f(p.quality_ci_low) if _finite(p.quality_ci_low) else 0.0
            hi = _f(p.quality_ci_high) - y if _finite(p.quality_ci_high) else 0.0
            c = color(i)
            ax.errorbar(
                [x],
                [y],
                yerr=[[max(lo, 0.0)], [max(hi, 0.0)]],
                fmt="o",
                markersize=9 if p.on_front else 7,
                markerfacecolor=c if p.on_front else "white",
                markeredgecolor=c,
                markeredgewidth=1.5,
                ecolor=c,
                elinewidth=1.2,
                capsize=3,
                zorder=3,
            )
            label = short(p.model) + ("  (front)" if p.on_front else "")
            ax.annotate(
                label,
                (x, y),
                xytext=(7, 5),
                textcoords="offset points",
                fontsize=8,
                color=c,
            )
        if log_x:
            ax.set_xscale("log")
            _plain_log_axis(ax)
        else:
            lo_x = min(costs)
            ax.set_xlim(left=0 if lo_x >= 0 else None)
            ax.margins(x=0.15)
        ax.set_xlabel(f"{decision.cost_basis} ({unit})" if unit else decision.cost_basis)
        ax.set_ylabel(short(decision.metric, 48))
        ax.set_title("Quality vs cost: filled = on the Pareto front")
        return _svg(fig, fig_id)


def learning_curves(curves: LearningCurves, fig_id: str = "fig-learning-curves") -> str:
    """Per model, the metric against the labelled images in the index, with its CI band."""
    drawn = 0
    with _style():
        fig = _figure(6.4, 4.0)
        ax = fig.add_subplot()
        xs_all: list[float] = []
        for i, curve in enumerate(curves.curves):
            pts = sorted(curve.points, key=lambda p: p.candidates)
            xs = [p.candidates for p in pts]
            ys = [_f(p.value) for p in pts]
            if not any(math.isfinite(y) for y in ys):
                continue
            drawn += 1
            xs_all += xs
            c = color(i)
            ax.plot(xs, ys, marker="o", markersize=4, color=c, label=short(curve.model))
            lo = [_f(p.ci_low) for p in pts]
            hi = [_f(p.ci_high) for p in pts]
            ax.fill_between(xs, lo, hi, color=c, alpha=0.15, linewidth=0)
        if not drawn:
            raise NoDataError("no curve has a defined value")
        if _spans_decades(xs_all):
            ax.set_xscale("log")
            _plain_log_axis(ax)
        ax.set_xlabel("labelled images in the index (mean over repeats)")
        ax.set_ylabel(short(curves.metric, 48))
        ax.set_title(f"Learning curves ({curves.repeats} repeats per size)")
        ax.legend(loc="lower right", fontsize=8)
        return _svg(fig, fig_id)


def confusion(matrix: ConfusionMatrix, title: str, fig_id: str) -> str:
    """Rows true, columns predicted; colour = share of the true class, counts when few classes."""
    n = len(matrix.labels)
    if n == 0 or not matrix.matrix:
        raise NoDataError("empty confusion matrix")
    rows = [list(r) for r in matrix.matrix]
    if len(rows) != n or any(len(r) != n for r in rows):
        raise NoDataError(f"confusion matrix is not {n}×{n}")
    shares = [[v / sum(r) if sum(r) else 0.0 for v in r] for r in rows]
    labels = [short(lb, 28) for lb in matrix.labels]
    side = min(max(3.2, 0.28 * n + 2.2), 11.0)
    with _style():
        fig = _figure(side + 1.0, side)
        ax = fig.add_subplot()
        ax.grid(False)
        # Many classes: the cells as one embedded bitmap (data URI), not thousands of paths.
        mesh = ax.pcolormesh(
            shares,
            cmap="Blues",
            vmin=0.0,
            vmax=1.0,
            edgecolors="none",
            rasterized=n > MAX_ANNOTATED_CLASSES,
        )
        ax.set_xlim(0, n)
        ax.set_ylim(n, 0)
        ax.set_aspect("equal")
        ticks = [i + 0.5 for i in range(n)]
        fs = 8 if n <= 15 else 6
        ax.set_xticks(ticks, labels, rotation=90, fontsize=fs)
        ax.set_yticks(ticks, labels, fontsize=fs)
        ax.tick_params(length=0)
        if n <= MAX_ANNOTATED_CLASSES:
            for r, row in enumerate(rows):
                for c, v in enumerate(row):
                    if v:
                        ax.text(
                            c + 0.5,
                            r + 0.5,
                            str(v),
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="white" if shares[r][c] > 0.6 else "#222222",
                        )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(short(title, 60))
        fig.colorbar(mesh, ax=ax, shrink=0.6, label="share of the true class")
        return _svg(fig, fig_id)


def per_class_f1(
    models: Sequence[tuple[str, Sequence[ClassMetrics]]], title: str, fig_id: str
) -> str:
    """Grouped horizontal bars: one group per class, one bar per model."""
    models = [(name, pcs) for name, pcs in models if pcs]
    if not models:
        raise NoDataError("no model has per-class scores")
    classes: list[str] = []
    for _, pcs in models:
        for pc in pcs:
            if pc.label not in classes:
                classes.append(pc.label)
    n, m = len(classes), len(models)
    height = min(max(2.5, n * (0.1 + 0.08 * m) + 1.4), 16.0)
    bar = 0.8 / m
    with _style():
        fig = _figure(6.4, height)
        ax = fig.add_subplot()
        for j, (name, pcs) in enumerate(models):
            f1 = {pc.label: pc.f1 for pc in pcs}
            ys = [i - 0.4 + bar * (j + 0.5) for i in range(n)]
            ax.barh(
                ys,
                [f1.get(c, 0.0) for c in classes],
                height=bar * 0.92,
                color=color(j),
                label=short(name),
            )
        ax.set_yticks(list(range(n)), [short(c, 28) for c in classes], fontsize=8)
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_xlim(0, 1.0)
        ax.set_xlabel("F1")
        ax.grid(axis="y", visible=False)
        ax.set_title(short(title, 60))
        fig.legend(loc="outside lower center", ncols=min(m, 4), fontsize=8)
        return _svg(fig, fig_id)


def trend(tr: Trend, fig_id: str = "fig-trend") -> str:
    """The metric per night and model (oldest first), CI band, baseline dashed, flags in red."""
    batches: list[str] = []
    for mt in tr.models:
        for p in mt.points:
            if p.batch_id not in batches:
                batches.append(p.batch_id)
    if not batches:
        raise NoDataError("no points")
    order = {b: i for i, b in enumerate(batches)}
    drawn = 0
    with _style():
        fig = _figure(6.4, 4.0)
        ax = fig.add_subplot()
        for i, mt in enumerate(tr.models):
            pts = sorted(mt.points, key=lambda p: order[p.batch_id])
            xs = [order[p.batch_id] for p in pts]
            ys = [_f(p.value) for p in pts]
            if not any(math.isfinite(y) for y in ys):
                continue
            drawn += 1
            c = color(i)
            ax.plot(xs, ys, marker="o", markersize=4, color=c, label=short(mt.model))
            lo = [_f(p.ci_low) for p in pts]
            hi = [_f(p.ci_high) for p in pts]
            ax.fill_between(xs, lo, hi, color=c, alpha=0.12, linewidth=0)
            if _finite(mt.baseline):
                ax.axhline(_f(mt.baseline), color=c, linestyle="--", linewidth=0.8, alpha=0.7)
            if mt.regression and pts and _finite(pts[-1].value):
                ax.plot(
                    [xs[-1]],
                    [_f(pts[-1].value)],
                    marker="X",
                    markersize=11,
                    color="#d62728",
                    zorder=4,
                )
        if not drawn:
            raise NoDataError("no model has a defined value on any night")
        step = max(1, math.ceil(len(batches) / 15))
        shown = list(range(0, len(batches), step))
        ax.set_xticks(shown, [short(batches[i], 20) for i in shown], rotation=45, ha="right")
        ax.set_xlabel("batch (oldest first)")
        ax.set_ylabel(short(tr.metric, 48))
        ax.set_title("Trend: dashed = baseline, X = regression flagged tonight")
        ax.legend(fontsize=8)
        return _svg(fig, fig_id)
