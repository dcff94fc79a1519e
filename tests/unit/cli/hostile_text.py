"""The hostile-text corpus (issue 9 §2): strings a label, group, key, model name or reason may
hold, each with what a person must see — the text itself, control and bidi characters shown
escaped (``kiban.text.printable``), nothing interpreted as terminal markup, Markdown or HTML.

Shared by the unit tests (terminal helpers, Markdown report, status) and the integration test
that runs a real embedded batch whose labels and file names are these strings.
"""

from __future__ import annotations

import html.parser
import re

from markdown_it import MarkdownIt

HOSTILE: dict[str, str] = {
    "rich-bold": "[bold]x[/]",
    "rich-close": "[/]",
    "rich-link": "[link=http://e]x[/link]",
    "html-script": "<script>alert(1)</script>",
    "pipe": "a|b",
    "backticks": "`x`",
    "math": "$x^2$",
    "ansi-red": "\x1b[31mred",
    "newline": "line\nbreak",
    "rtl-override": "\u202eevil",
    "long": "x" * 10_000,
    "emoji": "🙂 👨‍👩‍👧",
    "md-link": "[x](http://evil)",
    "md-image": "![i](http://e/i.png)",
    "md-emphasis": "*b* _i_ ~~s~~",
    "md-heading": "# h",
    "md-list": "1. one",
    "md-refdef": "[x]: http://evil",
    "entity": "&amp; &#60;",
    "emoji-code": ":warning:",
    "backslash": "a\\",
    "carriage-return": "over\rwrite",
    "c1-csi": "\x9b31m",
}

#: What no terminal output may contain raw: ESC, CSI, CR, the bidi override.
RAW_CONTROLS = ("\x1b", "\x9b", "\r", "\u202e")


class _Html(html.parser.HTMLParser):
    """Tags, and the text of every table cell / code span, of rendered Markdown."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.codes: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._code: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("td", "th"):
            self._cell = []
        elif tag == "code":
            self._code = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None
        elif tag == "code" and self._code is not None:
            self.codes.append("".join(self._code))
            self._code = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._code is not None:
            self._code.append(data)


def render_markdown_html(markdown: str) -> _Html:
    """CommonMark with GFM tables and strikethrough (what GitHub and GitLab render)."""
    html_text = MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown)
    parsed = _Html()
    parsed.feed(html_text)
    parsed.close()
    return parsed


def unwrapped(output: str) -> str:
    """Terminal output with the line breaks Rich inserts at its width removed."""
    return re.sub(r"\n", "", output)
