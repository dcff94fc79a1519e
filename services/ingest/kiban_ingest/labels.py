"""Where labels come from: the first folder level, or a CSV/JSONL manifest.

Folder labels (``<class>/<file>``) cost the user nothing; a manifest adds what folders
cannot say: the group (patient, slide, lot — the unit leave-one-out excludes) and a
split. Manifest problems are the user's to fix, so every error names the manifest and
the line. A manifest whose *structure* is wrong (no key,label header, broken CSV or JSON,
wrong field counts, duplicate keys) is rejected as a whole: it may not be a manifest at
all. A row whose key cannot name an object of the source (absolute, ``..``, a backslash,
control characters) is, when the caller collects ``rejected`` rows, set aside with its
line and reason — like a key that is missing from the source — and the rest applies.

Errors never quote the file's content: a file that is not a manifest (``/etc/passwd``,
an image) must not reappear line by line in a dead letter, a log or ``kiban status``.
They say "line 3: 3 fields, header has 2", never what line 3 says.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kiban.errors import KibanError, StoreError
from kiban.store import key_problem, printable_key, safe_key

#: Columns (CSV) or fields (JSONL) a manifest may have; ``key`` and ``label`` are required.
REQUIRED_FIELDS = ("key", "label")
OPTIONAL_FIELDS = ("group", "split")


class ManifestError(KibanError):
    """The manifest cannot be used; the message names the manifest and the line(s)."""


@dataclass(frozen=True)
class LabelEntry:
    """What the manifest says about one object key."""

    label: str | None
    group: str | None = None
    split: str | None = None
    line: int = 0


@dataclass(frozen=True)
class RejectedRow:
    """A manifest row set aside: its key cannot name an object of the source, or its label,
    group or split cannot be stored as text."""

    line: int
    key: str  # printable, at most 200 characters
    reason: str


def folder_label(key: str) -> str | None:
    """The first folder of ``key`` (``scratches/img1.jpg`` → ``scratches``); top level → None."""
    head, sep, _ = key.partition("/")
    return head if sep else None


def manifest_format(name: str, data: bytes) -> str:
    """``csv`` or ``jsonl``, from the name's suffix, else from the first character."""
    lower = name.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "jsonl" if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "csv"


def parse_manifest(
    data: bytes, name: str, rejected: list[RejectedRow] | None = None
) -> dict[str, LabelEntry]:
    """Parse a CSV (header row required) or JSONL manifest into key → LabelEntry.

    Keys are normalised with ``safe_key`` (relative to the source prefix, never
    escaping it). Empty labels/groups/splits mean "none". Duplicate keys, missing
    columns and bad rows raise ManifestError naming the line numbers. A key that cannot
    name an object (see ``_key_reason``) raises too, unless ``rejected`` is given: the
    row is then appended there and skipped.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"manifest {name}: not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None
    rows = (
        _csv_rows(text, name) if manifest_format(name, data) == "csv" else _jsonl_rows(text, name)
    )
    entries: dict[str, LabelEntry] = {}
    duplicates: dict[str, list[int]] = {}
    for line, row in rows:
        key = _key(row.get("key"), name, line, rejected)
        if key is None:
            continue
        try:
            entry = LabelEntry(
                label=_text(row.get("label"), "label", name, line),
                group=_text(row.get("group"), "group", name, line),
                split=_text(row.get("split"), "split", name, line),
                line=line,
            )
        except _UnusableTextError as exc:
            if rejected is None:
                raise ManifestError(f"manifest {name} line {line}: {exc}") from None
            rejected.append(RejectedRow(line, printable_key(key)[:200], str(exc)))
            continue
        if key in entries:
            duplicates.setdefault(key, [entries[key].line]).append(line)
            continue
        entries[key] = entry
    if duplicates:
        shown = "; ".join(
            f"{key!r} on lines {', '.join(map(str, lines))}"
            for key, lines in list(duplicates.items())[:10]
        )
        more = f" (and {len(duplicates) - 10} more keys)" if len(duplicates) > 10 else ""
        raise ManifestError(f"manifest {name}: duplicate keys: {shown}{more}")
    return entries


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise ManifestError(f"manifest {name} line 1: {exc}") from None
    if header is None:
        raise ManifestError(
            f"manifest {name}: empty (a header row key,label[,group][,split] is required)"
        )
    columns = [c.strip().lower() for c in header]
    missing = [c for c in REQUIRED_FIELDS if c not in columns]
    if missing:  # the header is not quoted: the file may not be a manifest at all
        raise ManifestError(
            f"manifest {name} line 1: expected a header row naming the columns "
            f"key,label[,group][,split]; missing {', '.join(missing)} "
            f"({len(header)} column(s) found)"
        )
    known = (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)
    repeated = sorted({c for c in columns if c in known and columns.count(c) > 1})
    if repeated:
        raise ManifestError(f"manifest {name} line 1: repeated columns {', '.join(repeated)}")
    wanted = {c: columns.index(c) for c in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS) if c in columns}
    while True:
        line = reader.line_num + 1  # where the row starts (a quoted field may span lines)
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ManifestError(f"manifest {name} line {reader.line_num}: {exc}") from None
        if not any(v.strip() for v in values):
            continue  # blank line
        if len(values) < len(columns):
            values = values + [""] * (len(columns) - len(values))
        elif len(values) > len(columns):
            raise ManifestError(
                f"manifest {name} line {line}: {len(values)} fields, header has {len(columns)}"
            )
        yield line, {field: values[index] for field, index in wanted.items()}


def _jsonl_rows(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest {name} line {line}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"manifest {name} line {line}: expected a JSON object")
        missing = [f for f in REQUIRED_FIELDS if f not in obj]
        if missing:
            raise ManifestError(
                f"manifest {name} line {line}: missing field(s) {', '.join(missing)}"
            )
        yield line, obj


def _key(value: Any, name: str, line: int, rejected: list[RejectedRow] | None) -> str | None:
    """The normalised key of a row; None when the row is set aside in ``rejected``."""
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"manifest {name} line {line}: empty or non-text key")
    text = value.strip()
    reason = _key_reason(text)
    if reason is None:
        return safe_key(text)
    if rejected is None:
        raise ManifestError(f"manifest {name} line {line}: {reason}")
    rejected.append(RejectedRow(line, printable_key(text)[:200], reason))
    return None


def _key_reason(text: str) -> str | None:
    """Why a manifest key cannot name an object of the source, in content-free words."""
    try:
        normal = safe_key(text)
    except StoreError:
        if text.startswith("/"):
            return "key escapes the source (absolute path; keys are relative to the source)"
        if "\x00" in text or "\\" in text:
            return "key is not a valid object key (NUL or backslash)"
        return "key escapes the source ('..' or '.' segment)"
    problem = key_problem(normal)
    return f"key is not a valid object key ({problem})" if problem else None


class _UnusableTextError(ValueError):
    """A label, group or split that cannot be stored as text: the row is set aside."""


def _text(value: Any, field: str, name: str, line: int) -> str | None:
    """A label/group/split: text, or a number (patient 17), or empty/null for none."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ManifestError(
            f"manifest {name} line {line}: {field} must be text or an integer, "
            f"got {type(value).__name__}"
        )
    text = str(value).strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a JSON "\udcff": no UTF-8 record or report can hold it
        raise _UnusableTextError(f"{field} is not valid Unicode text (a lone surrogate)") from None
    return text or None
