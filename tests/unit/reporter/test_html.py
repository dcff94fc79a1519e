"""report.html: one self-contained page, figures inline, every user string shown as data."""

from __future__ import annotations

import html
import json
import re
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_factory import HOSTILE, build_report
from typer.testing import CliRunner

from kiban.records import report_prefix
from kiban.settings import load_settings
from kiban.store import FileStore, open_store
from kiban_reporter import figures
from kiban_reporter import html as report_html
from kiban_reporter.decision_schema import ParetoPoint
from kiban_reporter.html import render_html, write_html
from kiban_reporter.markdown import render_markdown
from kiban_reporter.report import Report

SVG_NS = "http://www.w3.org/2000/svg"
NAMESPACE_DECLARATIONS = {
    'xmlns="http://www.w3.org/2000/svg"',
    'xmlns:xlink="http://www.w3.org/1999/xlink"',
}
VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base", "source"}
FIGURES = (
    "fig-pareto",
    "fig-learning-curves",
    "fig-confusion-0",
    "fig-confusion-1",
    "fig-per-class-f1",
    "fig-trend",
)


class Page(HTMLParser):
    """A strict reading of the page: balanced tags, the tags seen, ids and the visible text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.ids: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed tags: {self.stack}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)  # <path .../> inside SVG

    def _attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            self.attrs.append((tag, name, value))
            if name == "id" and value:
                self.ids.append(value)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def svgs(page: str) -> dict[str, ET.Element]:
    """Every inline SVG, parsed as XML, by its figure id."""
    out = {}
    for m in re.finditer(r"<figure id=\"([^\"]+)\">(<svg.*?</svg>)", page, re.S):
        out[m.group(1)] = ET.fromstring(m.group(2))
    return out


def svg_texts(svg: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in svg.iter(f"{{{SVG_NS}}}text")]


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(build_report())


def test_page_parses_with_every_figure_in_order(page: str) -> None:
    parsed = Page(page)
    assert page.startswith("<!DOCTYPE html>")
    assert len(parsed.ids) == len(set(parsed.ids)), "duplicate ids"
    for fig_id in FIGURES:
        assert f'<figure id="{fig_id}">' in page, fig_id
    drawn = svgs(page)
    assert set(drawn) == set(FIGURES)
    for svg in drawn.values():
        assert svg.tag == f"{{{SVG_NS}}}svg" and svg_texts(svg)
    # the decision line first, then the sections in the promised order
    order = [
        'id="decision"',
        'id="fig-pareto"',
        'id="non-inferiority"',
        'id="cost"',
        'id="fig-learning-curves"',
        'id="fig-confusion-0"',
        'id="fig-per-class-f1"',
        'id="fig-trend"',
        'id="metrics"',
        'id="comparisons"',
        'id="leakage"',
        'id="failed-chunks"',
        'id="warnings"',
        'id="protocol"',
    ]
    positions = [page.index(marker) for marker in order]
    assert positions == sorted(positions)
    body = page[page.index("<body>") :]
    assert body.index('id="decision"') < body.index("<section")


def test_the_numbers_are_the_reports(page: str) -> None:
    report = build_report()
    text = html.unescape(page)
    assert report.decision is not None and report.decision.line in text
    for ni in report.decision.non_inferiority:
        assert ni.statement in text
    small = report.models[0]
    assert small.retrieval is not None
    est = small.retrieval.at(5).mv_macro_f1
    assert f"{est.value:.3f} [{est.ci_low:.3f}, {est.ci_high:.3f}]" in text
    projection = small.cost.projection
    assert projection is not None
    assert f"{projection.price_per_month:.2f} USD" in text and "250,000" in text
    assert report.learning_curves is not None and report.learning_curves.statement in text
    assert report.trend is not None and "Regression flagged tonight: big-clip" in text
    assert "queries it was trained on (excluded)" in text
    for verdict in report.verdicts:
        assert verdict in text
    assert report.warnings[0] in text and "decode failed" in text


def test_self_contained_no_script_link_or_external_url(page: str) -> None:
    assert_self_contained(page)


def assert_self_contained(page: str) -> None:
    parsed = Page(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert "iframe" not in parsed.tags and "object" not in parsed.tags
    for tag, name, value in parsed.attrs:
        assert name != "src", (tag, name, value)
        if name in ("href", "xlink:href"):
            assert value and (value.startswith("#") or value.startswith("data:image/")), value
    rest = page
    for decl in NAMESPACE_DECLARATIONS:
        rest = rest.replace(decl, "")
    assert "http" not in rest.lower()
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=\s]+", "", rest)
    assert "//" not in re.sub(r"<style>.*?</style>", "", rest, flags=re.S).replace("://", "")
    assert "@import" not in page and "url(" not in page.replace("url(#", "")


def test_hostile_strings_are_literal_text_everywhere() -> None:
    names = ["<script>alert(1)</script>", "$x^2$ [/]|&amp;", '"quotes" 日本🙂 ' + "y" * 200]
    report = build_report(labels=HOSTILE, model_names=names, batch_id="<b>&amp;$x^2$</b>")
    page = render_html(report)
    parsed = Page(page)
    assert "script" not in parsed.tags and "b" not in parsed.tags
    assert html.escape("<script>alert(1)</script>") in page
    assert "&amp;amp;" in page and "&quot;quotes&quot;" in page
    text = "".join(parsed.text)
    for s in [*HOSTILE, *names, "<b>&amp;$x^2$</b>"]:
        assert s in text, s[:40]
    # in the figures: drawn as the literal characters, never as mathtext, XML-escaped
    drawn = svgs(page)
    assert "fig-confusion-0" in drawn and "fig-per-class-f1" in drawn
    confusion_texts = svg_texts(drawn["fig-confusion-0"])
    assert "$x^2$" in confusion_texts and "<script>alert(1)</script>" in confusion_texts
    assert "&amp;" in confusion_texts and '"quotes"' in confusion_texts
    assert any(t.startswith("xxxxxxxx") and t.endswith("…") for t in confusion_texts)
    assert "$x^2$ [/]|&amp;" in svg_texts(drawn["fig-pareto"])
    assert "mathdefault" not in page and "\\math" not in page


def test_log_cost_axis_has_plain_tick_labels() -> None:
    page = render_html(build_report(model_names=["a", "b", "c"], costs=[0.01, 0.1, 1.0]))
    texts = svg_texts(svgs(page)["fig-pareto"])
    assert {"0.01", "0.1", "1"} <= set(texts)
    assert not any("$" in t for t in texts)


def test_missing_inputs_become_notes_not_crashes() -> None:
    full = build_report()
    cost = full.models[0].cost.model_copy(update={"projection": None})
    unscored = full.models[1].model_copy(
        update={"retrieval": None, "ann_check": None, "cost": cost}
    )
    report = full.model_copy(
        update={
            "decision": None,
            "learning_curves": None,
            "trend": None,
            "leakage": [],
            "models": [full.models[0].model_copy(update={"cost": cost}), unscored],
            "comparisons": [],
            "verdicts": [],
            "failed_chunks": [],
            "warnings": [],
        }
    )
    page = render_html(report)
    Page(page)
    for fig_id in ("fig-pareto", "fig-learning-curves", "fig-trend", "fig-confusion-1"):
        assert f'<figure id="{fig_id}"' not in page
        assert f'id="{fig_id}-note"' in page
    assert '<figure id="fig-confusion-0">' in page and '<figure id="fig-per-class-f1">' in page
    assert "No decision recorded in this report" in page
    assert "No cost projection" in page and "No chunk failed." in page

    nothing = report.model_copy(
        update={
            "models": [m.model_copy(update={"retrieval": None}) for m in report.models],
            "batch": report.batch.model_copy(update={"labelled": False, "classes": []}),
        }
    )
    page = render_html(nothing)
    Page(page)
    assert "Not scored: the batch has no labels" in page
    assert '<figure id="fig-per-class-f1"' not in page and 'id="fig-per-class-f1-note"' in page

    empty = render_html(full.model_copy(update={"models": [], "comparisons": [], "verdicts": []}))
    Page(empty)
    assert "No model in this report." in empty


def test_figures_without_usable_values_are_notes() -> None:
    report = build_report()
    assert report.decision is not None
    no_cost = [
        ParetoPoint(model=p.model, quality=p.quality, cost=None, on_front=True)
        for p in report.decision.pareto
    ]
    decision = report.decision.model_copy(update={"pareto": no_cost})
    page = render_html(report.model_copy(update={"decision": decision}))
    assert '<figure id="fig-pareto"' not in page
    assert "no model has both a quality and a cost" in page
    assert report.decision.line in page


def test_a_failing_figure_costs_only_that_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object, **_kwargs: object) -> str:
        raise RuntimeError("<kaput>")

    monkeypatch.setattr(figures, "trend", boom)
    page = render_html(build_report())
    assert 'id="fig-trend-note"' in page and "RuntimeError: &lt;kaput&gt;" in page
    assert '<figure id="fig-pareto">' in page


def test_rendering_is_deterministic_and_round_trips_through_json() -> None:
    report = build_report()
    again = Report.model_validate(json.loads(report.to_json()))
    assert render_html(again) == render_html(report)


def test_three_models_thirty_classes_render_quickly() -> None:
    labels = [f"class-{i:02d}" for i in range(30)]
    report = build_report(labels=labels, model_names=["a", "b", "c"], per_class=8)
    render_html(report)  # matplotlib import and font cache
    start = time.perf_counter()
    page = render_html(report)
    seconds = time.perf_counter() - start
    assert seconds < 10.0, f"{seconds:.1f} s"  # ~1.3 s on 2 busy cores
    assert len(page) < 1_500_000
    assert len(svgs(page)) == 7  # pareto, curves, 3 confusion matrices, F1 bars, trend
    assert_self_contained(page)  # 30 classes: the confusion cells are an inline data: PNG
    assert page.count('xlink:href="data:image/png;base64,') >= 3


def test_markdown_still_renders_the_v3_report() -> None:
    assert "kiban report" in render_markdown(build_report())


def test_write_html_stores_the_page_beside_the_json(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    report = build_report()
    key = write_html(store, report)
    assert key == f"{report_prefix(report.batch_id)}/{report.version}/report.html"
    assert store.get(key).decode() == render_html(report)
    assert report_html.html_key(report) == key


def _stored(report: Report, with_html: bool) -> None:
    settings = load_settings()
    store = open_store(settings.resolved_store_uri, create=True)
    prefix = f"{report_prefix(report.batch_id)}/{report.version}"
    store.put(f"{prefix}/report.json", report.to_json().encode())
    if with_html:
        store.put(f"{prefix}/report.html", b"<!DOCTYPE html><p>stored page</p>")


def test_cli_writes_the_stored_page_or_renders_older_reports(tmp_path: Path) -> None:
    from kiban_cli.main import app

    old = build_report(v3=False, batch_id="night-01")  # a v2-era report: no report.html
    _stored(old, with_html=False)
    result = CliRunner().invoke(app, ["report", "show", "night-01", "--html"])
    assert result.exit_code == 0, result.output
    default = load_settings().home / "reports" / "night-01-0002.html"
    assert result.output.strip() == str(default)
    written = default.read_text()
    assert written == render_html(old) and 'id="fig-confusion-0"' in written

    new = build_report(batch_id="b2")
    _stored(new, with_html=True)
    out = tmp_path / "out" / "page.html"
    result = CliRunner().invoke(
        app, ["report", "show", "b2", "--version", "0002", "--html", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    assert out.read_text() == "<!DOCTYPE html><p>stored page</p>"

    result = CliRunner().invoke(app, ["report", "show", "nosuch", "--html"])
    assert result.exit_code == 2 and "no report for batch" in result.output


def test_default_html_path_is_a_file_name_under_home(tmp_path: Path) -> None:
    from kiban_cli.report_html import default_html_path

    reports = tmp_path / "reports"
    assert default_html_path(tmp_path, "night-01", "0002") == reports / "night-01-0002.html"
    assert default_html_path(tmp_path, "../a b/c", "0001") == reports / "a_b_c-0001.html"
