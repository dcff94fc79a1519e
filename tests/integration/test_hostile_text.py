"""A real embedded `kiban run` whose labels, groups and file names are hostile text
(issue 9 §2): Rich markup, HTML, Markdown, pipes, backticks, math, terminal escapes, line
breaks, a right-to-left override, 10 000 characters, emoji. Nothing crashes — the run, the
in-process workers, `kiban status`, `kiban report show` (terminal, --markdown, --json) — and
everything is shown as typed: no raw control character reaches the terminal, no label changes
a Markdown table or becomes a link, markup or HTML.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiban.text import printable
from kiban_cli.main import app
from kiban_cli.synthetic import encode, sample_images
from kiban_reporter.markdown import md_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "cli"))
from hostile_text import HOSTILE, RAW_CONTROLS, render_markdown_html, unwrapped  # noqa: E402

pytestmark = pytest.mark.integration

PER_LABEL = 2
BATCH = "hostile-text"
# File names a source may hold (accepted), and two it may not (quarantined, shown escaped).
ACCEPTED_NAMES = [
    "[bold]x[/].jpg",
    "<script>alert(1)<",
    "a|b.jpg",
    "`x`.jpg",
    "$x^2$.jpg",
    "🙂 👨‍👩‍👧.jpg",
    "[x](http:evil).jpg",
    "y" * 200 + ".jpg",
]
QUARANTINED_NAMES = ["esc\x1b[31m.jpg", "new\nline.jpg"]


def make_source(folder: Path) -> tuple[list[str], list[str]]:
    """Images under hostile names, labelled, grouped and split by hostile strings (a JSONL
    manifest, which can carry any text): of each label's two images one is in split
    ``test`` (a query), the other in a split named by the label; returns (labels, keys)."""
    labels = list(HOSTILE.values())
    images = sample_images(len(labels) * PER_LABEL + len(QUARANTINED_NAMES), seed=11)
    rows, keys = [], []
    for i, label in enumerate(label for label in labels for _ in range(PER_LABEL)):
        key = f"img/{i:03d}-{ACCEPTED_NAMES[i % len(ACCEPTED_NAMES)]}"
        if not key.endswith(".jpg"):
            key += ".jpg"
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(images[i], ".jpg"))
        group = labels[(i + 1) % len(labels)]  # the two images of a label in two groups
        split = "test" if i % 2 == 0 else label
        rows.append(json.dumps({"key": key, "label": label, "group": group, "split": split}))
        keys.append(key)
    for j, name in enumerate(QUARANTINED_NAMES):
        (folder / "img" / name).write_bytes(encode(images[-1 - j], ".jpg"))
    (folder / "labels.jsonl").write_text("\n".join(rows) + "\n")
    return labels, keys


def no_raw_controls(output: str) -> None:
    for raw in RAW_CONTROLS:
        assert raw not in output, repr(raw)


@pytest.mark.timeout(900)
def test_hostile_labels_and_names_through_run_status_and_report(
    tmp_path: Path,
    publish_models,  # type: ignore[no-untyped-def]
) -> None:
    from kiban.records import read_records
    from kiban.settings import load_settings
    from kiban.store import open_store

    settings = load_settings()  # the CLI's own: KIBAN_HOME of this test
    store = open_store(settings.resolved_store_uri, create=True)
    model = publish_models(store)[0]
    source = tmp_path / "source"
    labels, keys = make_source(source)
    runner = CliRunner()

    run = runner.invoke(
        app,
        [
            "run",
            "--source",
            source.as_uri(),
            "--manifest",
            "labels.jsonl",
            "--models",
            model,
            "--batch",
            BATCH,
        ],
    )
    assert run.exit_code == 0, run.output
    no_raw_controls(run.output)
    assert f"batch {BATCH}" in run.output and model in run.output
    assert {r.key for r in read_records(store, BATCH)} == set(keys)

    status = runner.invoke(app, ["status", BATCH])
    assert status.exit_code == 0, status.output
    no_raw_controls(status.output)
    assert f"{len(keys)} accepted, {len(QUARANTINED_NAMES)} quarantined" in status.output
    listing = runner.invoke(app, ["status"])
    assert listing.exit_code == 0 and BATCH in unwrapped(listing.output), listing.output

    shown = runner.invoke(app, ["report", "show", BATCH])
    assert shown.exit_code == 0, shown.output
    no_raw_controls(shown.output)
    assert shown.output.lstrip().startswith("Decision:")

    as_json = runner.invoke(app, ["report", "show", BATCH, "--json"])
    assert as_json.exit_code == 0, as_json.output
    no_raw_controls(as_json.output)
    report = json.loads(as_json.output)
    assert report["batch"]["classes"] == sorted(labels)  # every label kept, as typed
    assert report["protocol"]["n_images"] == len(keys)
    quarantined = {q["key"] for q in report["batch"]["quarantine"]}
    assert quarantined == {"img/esc\\x1b[31m.jpg", "img/new\\nline.jpg"}

    markdown = runner.invoke(app, ["report", "show", BATCH, "--markdown"])
    assert markdown.exit_code == 0, markdown.output
    no_raw_controls(markdown.output)
    for label in labels:
        assert f"| {md_text(label)} |" in markdown.output, label[:40]
    stored_md = store.get(f"reports/{BATCH}/{report['version']}/report.md").decode()
    assert markdown.output.rstrip("\n") == stored_md.rstrip("\n")
    rendered = render_markdown_html(stored_md)
    assert not {"a", "img", "script", "em", "del", "s", "ol"} & set(rendered.tags)
    for label in labels:  # the per-class table and the confusion matrix
        assert printable(label) in rendered.cells, label[:40]
    for key in quarantined:
        assert key in rendered.codes
    assert f"kiban report — batch {BATCH}" in "".join(rendered.text)

    # The terminal shows user text too: re-evaluated with a query split no image is in, the
    # report warns and lists the manifest's split names — the hostile strings, escaped.
    again = runner.invoke(
        app, ["evaluate", "--batch", BATCH, "--protocol", "split", "--query-split", "none-here"]
    )
    assert again.exit_code == 0, again.output
    no_raw_controls(again.output)
    compact = "".join(again.output.split())
    assert "warning:split:noimageisinsplit'none-here'" in compact
    for label in labels:
        assert "".join(printable(label).split()) in compact, label[:40]
