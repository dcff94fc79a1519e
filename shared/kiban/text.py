"""User text (keys, file names, labels, groups, model names, batch IDs, reasons, paths) as
data: what every place that shows it — the terminal, the Markdown report, logs — builds on.

``printable`` escapes what would act on a terminal or reorder a line instead of being read:
C0/C1 control characters (newline, carriage return, ESC of colour and cursor sequences, DEL),
the bidirectional overrides and isolates (U+202A–U+202E, U+2066–U+2069, U+200E/U+200F,
U+061C) and the Unicode line and paragraph separators, shown as ``\\n``, ``\\x1b``,
``\\u202e``. Lone surrogates (bytes of a name that were not UTF-8, Python's surrogateescape)
become ``\\xNN``: printing them would otherwise fail with UnicodeEncodeError. Everything
else — accents, CJK, emoji with their joiners — is shown as is.
"""

from __future__ import annotations

import re

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}\u2028\u2029\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: a byte that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: object, keep: str = "") -> str:
    """``text`` with control, bidi-override and surrogate characters escaped.

    ``keep``: characters left alone (``"\\n"`` for a multi-line document such as report.md).
    """
    value = str(text)
    if keep:
        return _UNSAFE.sub(lambda m: m.group() if m.group() in keep else _escape(m.group()), value)
    return _UNSAFE.sub(lambda m: _escape(m.group()), value)


def one_line(text: object) -> str:
    """``text`` on one printable line: line breaks become "; ", other controls escaped."""
    parts = [part.strip() for part in re.split(r"[\r\n\u2028\u2029]+", str(text))]
    return printable("; ".join(p for p in parts if p))
