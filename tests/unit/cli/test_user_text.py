"""User text is data (issue 9 §2): labels, keys, model names, batch IDs and reasons are shown
as typed — never read as Rich markup, Markdown or HTML — with control and bidi characters
shown escaped; one poisoned record never fails `kiban status`.

Each hostile string of ``hostile_text.HOSTILE`` goes through the terminal helpers, the
Markdown report (rendered by a CommonMark + GFM-table renderer and read back), the JSON
output, and `kiban report show` (terminal, --markdown, --json) on a stored report whose
labels, model names, verdicts and warnings hold them.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from hostile_text import HOSTILE, RAW_CONTROLS, render_markdown_html, unwrapped
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from kiban.text import printable
from kiban_cli.common import json_text, shown
from kiban_cli.main import app
from kiban_reporter.markdown import md_code, md_text, render_markdown

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reporter"))
from report_factory import build_report  # noqa: E402

CASES = list(HOSTILE.items())
IDS = [name for name, _ in CASES]


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=30_000, emoji=False, force_terminal=False), out


# --- terminal -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), CASES, ids=IDS)
def test_shown_is_displayed_as_typed(name: str, text: str) -> None:
    console, out = _console()
    console.print(f"[bold]label:[/] {shown(text)} [red]end[/]", soft_wrap=True)
    assert out.getvalue() == f"label: {printable(text)} end\n"
    for raw in RAW_CONTROLS:
        assert raw not in out.getvalue()


@pytest.mark.parametrize(("name", "text"), CASES, ids=IDS)
def test_shown_in_a_table_cell(name: str, text: str) -> None:
    console, out = _console()
    table = Table()
    table.add_column("label", overflow="fold")
    table.add_row(shown(text))
    console.print(table)
    assert printable(text) in out.getvalue()


def test_printable_escapes_controls_and_keeps_the_rest() -> None:
    assert printable("a\x1b[31mb") == "a\\x1b[31mb"
    assert printable("l1\nl2\r\t") == "l1\\nl2\\r\\t"
    assert printable("\u202eevil\u2066") == "\\u202eevil\\u2066"
    assert printable("bad\udcff") == "bad\\xff"  # surrogateescape: a byte that was not UTF-8
    assert printable("\x9b\x7f") == "\\x9b\\x7f"
    assert printable("ünïcødé 日本 🙂 👨‍👩‍👧") == "ünïcødé 日本 🙂 👨‍👩‍👧"
    assert printable("a\nb", keep="\n") == "a\nb"


@pytest.mark.parametrize(("name", "text"), CASES, ids=IDS)
def test_json_output_is_valid_and_inert(name: str, text: str) -> None:
    data = {"label": text, "nested": [{"key": text}]}
    out = json_text(data)
    assert json.loads(out) == data
    for raw in RAW_CONTROLS:
        assert raw not in out


# --- Markdown report ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), CASES, ids=IDS)
def test_markdown_text_and_code_are_literal(name: str, text: str) -> None:
    md = "\n".join(
        [
            "| label | key | n |",
            "|---|---|---|",
            f"| {md_text(text)} | {md_code(text, cell=True)} | 1 |",
            "",
            f"- {md_text(text)}",
            "",
            f"## {md_text(text)}",
            "",
            f"inline {md_code(text)} end",
            "",
        ]
    )
    rendered = render_markdown_html(md)
    want = printable(text)
    assert rendered.cells == ["label", "key", "n", want, want, "1"]  # no cell added or lost
    assert rendered.codes == [want, want]
    assert set(rendered.tags) == {"table", "thead", "tbody", "tr", "th", "td", "code"} | {
        "ul",
        "li",
        "h2",
        "p",
    }, rendered.tags  # no link, image, script, emphasis, strike, heading or list from data
    text_out = "".join(rendered.text)
    assert f"\n{want}\n" in text_out  # the list item and the heading, as typed
    for raw in RAW_CONTROLS:
        assert raw not in md


def test_markdown_leaves_ordinary_text_alone() -> None:
    """Escaping is where it matters: a CI in brackets, a word with an underscore, 'p < 0.05'
    and 'A & B' keep their raw form (what the other report tests compare against)."""
    for plain in (
        "Run small: MV@5 macro-F1 0.812 [0.780, 0.840]",
        "stripes_fine",
        "p < 0.05",
        "A & B",
    ):
        assert md_text(plain) == plain


def _hostile_report(batch_id: str = "hostile-1"):  # type: ignore[no-untyped-def]
    labels = [text for name, text in CASES if name != "long"] + ["y" * 10_000]
    names = ["[bold]m[/]", "<b>m2</b>"]
    report = build_report(labels=labels, model_names=names, per_class=3, batch_id=batch_id)
    from kiban_reporter.report import SearchScope

    search = SearchScope(
        mode="streamed",
        statement="10 sampled queries of [bold]12[/] <b>rows</b>, exact against the full index",
        n_rows=12,
        exact_max_vectors=10,
        n_shards=2,
    )
    protocol = report.protocol.model_copy(update={"search": search})
    verdicts = [f"verdict on {label}" for label in labels]
    return report.model_copy(update={"verdicts": verdicts, "protocol": protocol})


def test_rendered_report_shows_every_label_as_typed() -> None:
    report = _hostile_report()
    md = render_markdown(report)
    for raw in RAW_CONTROLS:
        assert raw not in md
    rendered = render_markdown_html(md)
    assert not {"a", "img", "script", "em", "del", "s", "ol"} & set(rendered.tags)
    for label in report.batch.classes:
        assert printable(label) in rendered.cells, label[:40]  # per-class and confusion tables
    for entry in report.batch.quarantine:  # the quarantine table's key column
        assert printable(entry["key"]) in rendered.codes
    for name in ("[bold]m[/]", "<b>m2</b>"):
        assert name in rendered.cells


# --- `kiban report show` ------------------------------------------------------------------


def _store_report(report) -> None:  # type: ignore[no-untyped-def]
    from kiban.settings import load_settings
    from kiban.store import open_store

    settings = load_settings()
    store = open_store(settings.resolved_store_uri, create=True)
    prefix = f"reports/{report.batch_id}/{report.version}"
    store.put(f"{prefix}/report.json", report.to_json().encode())
    store.put(f"{prefix}/report.md", render_markdown(report).encode())


def test_report_show_terminal_markdown_and_json() -> None:
    report = _hostile_report()
    _store_report(report)
    runner = CliRunner()

    terminal = runner.invoke(app, ["report", "show", report.batch_id])
    assert terminal.exit_code == 0, terminal.output
    out = terminal.output
    for raw in RAW_CONTROLS:
        assert raw not in out
    flat = unwrapped(out)
    assert "[bold]m[/]" in flat and "<b>m2</b>" in flat  # markup shown, not applied
    assert "search: 10 sampled queries of [bold]12[/] <b>rows</b>, exact against" in flat
    for label in report.batch.classes:
        assert f"verdict on {printable(label)}" in flat, label[:40]

    markdown = runner.invoke(app, ["report", "show", report.batch_id, "--markdown"])
    assert markdown.exit_code == 0, markdown.output
    assert markdown.output.rstrip("\n") == render_markdown(report).rstrip("\n")

    as_json = runner.invoke(app, ["report", "show", report.batch_id, "--json"])
    assert as_json.exit_code == 0, as_json.output
    for raw in RAW_CONTROLS:
        assert raw not in as_json.output
    assert json.loads(as_json.output) == json.loads(report.to_json())


# --- `kiban status` with poisoned records -------------------------------------------------


def test_status_lists_the_store_around_poisoned_records(tmp_path: Path) -> None:
    from kiban.context import Context
    from kiban.messages import IngestBatch
    from kiban.settings import load_settings
    from kiban_cli.synthetic import generate_texture_dataset
    from kiban_ingest.ingest import ingest_batch

    settings = load_settings()
    ctx = Context.from_settings(settings)
    source = tmp_path / "images"
    generate_texture_dataset(source, n_classes=2, per_class=3, size=32, seed=1)
    (source / "manifest.csv").unlink()
    ingest_batch(IngestBatch(batch_id="good", source=source.as_uri()), ctx)
    store = ctx.store
    secret = b"root:x:0:0:secret-line-77f"
    store.put("batches/corrupt/batch.json", b"{" + secret)  # not JSON
    store.put("batches/wrong/batch.json", b'{"batch_id": 3}')  # JSON, not a batch
    store.put("batches/[red]x/batch.json", secret)
    store.put("deadletter/kiban.ingest.batch/0001.json", secret)
    store.put("deadletter/kiban.ingest.batch/0002.json", b"[1, 2]")
    store.put("deadletter/kiban.ingest.batch/0003.json", b"\xff\xfe")
    store.put("embeddings/m/good/chunk-00000.json", secret)  # a shard meta that does not parse
    store.put("batches/good/progress/indexed/m/chunk-99999", secret)  # outside the plan
    store.put("batches/good/progress/failed/m/chunk-00000.json", secret)
    runner = CliRunner()

    listing = runner.invoke(app, ["status"])
    assert listing.exit_code == 0, listing.output
    flat = unwrapped(listing.output)
    assert "good" in flat and "unreadable" in flat
    assert "[red]x" in flat  # a batch folder named like markup is shown as named
    assert "dead letters: 3" in flat
    assert "secret-line" not in flat and "root:x" not in flat  # reasons never quote content

    rows = json.loads(runner.invoke(app, ["status", "--json"]).output)
    by_batch = {row["batch"]: row for row in rows}
    assert by_batch["good"]["unreadable"] is None and by_batch["good"]["accepted"] == 6
    for bad in ("corrupt", "wrong", "[red]x"):
        assert by_batch[bad]["unreadable"], bad
        assert "secret-line" not in by_batch[bad]["unreadable"]

    one = runner.invoke(app, ["status", "good"])
    assert one.exit_code == 0, one.output
    flat = unwrapped(one.output)
    assert "unreadable" in flat and "embeddings/m/good/chunk-00000.json" in flat
    assert "secret-line" not in flat
    state = json.loads(runner.invoke(app, ["status", "good", "--json"]).output)
    (model,) = state["models"]
    assert model["indexed"] == 0 and model["failed"] == 1  # chunk 99999 is not in the plan
    assert len(state["unreadable"]) == 1

    corrupt = runner.invoke(app, ["status", "corrupt"])
    assert corrupt.exit_code == 0, corrupt.output
    assert "unreadable" in corrupt.output and "secret-line" not in corrupt.output
