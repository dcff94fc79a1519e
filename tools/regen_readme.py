"""Regenerate the README settings table from kiban.settings (``make docs``)."""

from __future__ import annotations

import re
from pathlib import Path

from kiban.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- settings:begin[^\n]*-->\n).*?(<!-- settings:end -->)", re.S)


def main() -> None:
    text = README.read_text()
    README.write_text(BLOCK.sub(lambda m: m.group(1) + settings_table() + "\n" + m.group(2), text))


if __name__ == "__main__":
    main()
