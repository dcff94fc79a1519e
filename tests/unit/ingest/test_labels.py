"""Labels from folders and from CSV/JSONL manifests; every manifest error names its line."""

from __future__ import annotations

import json
import re

import pytest

from kiban.errors import KibanError
from kiban_ingest.labels import (
    LabelEntry,
    ManifestError,
    RejectedRow,
    folder_label,
    manifest_format,
    parse_manifest,
)


def test_folder_label_is_first_level() -> None:
    assert folder_label("scratches/img1.jpg") == "scratches"
    assert folder_label("scratches/lot3/img1.jpg") == "scratches"
    assert folder_label("img1.jpg") is None


def test_csv_manifest_with_groups_and_splits() -> None:
    data = b"key,label,group,split\na/1.jpg,crazing,lot-1,train\nb/2.jpg,pitted,17,test\n3.jpg,,,\n"
    entries = parse_manifest(data, "m.csv")
    assert entries["a/1.jpg"] == LabelEntry("crazing", "lot-1", "train", line=2)
    assert entries["b/2.jpg"] == LabelEntry("pitted", "17", "test", line=3)
    assert entries["3.jpg"] == LabelEntry(None, None, None, line=4)


def test_csv_column_order_case_bom_and_extra_columns() -> None:
    data = "\ufeffLabel,notes,Key\r\ncrazing,hello,x/1.png\r\n\r\n".encode()
    entries = parse_manifest(data, "m.csv")
    assert entries == {"x/1.png": LabelEntry("crazing", None, None, line=2)}


def test_csv_key_is_normalised() -> None:
    entries = parse_manifest(b"key,label\na//b.jpg,x\n", "m.csv")
    assert list(entries) == ["a/b.jpg"]


def test_jsonl_manifest() -> None:
    lines = [
        {"key": "a/1.jpg", "label": "crazing", "group": 3},
        {},
        {"key": "b/2.jpg", "label": None, "split": "val"},
    ]
    text = "\n".join("" if not obj else json.dumps(obj) for obj in lines) + "\n"
    entries = parse_manifest(text.encode(), "m.jsonl")
    assert entries["a/1.jpg"] == LabelEntry("crazing", "3", None, line=1)
    assert entries["b/2.jpg"] == LabelEntry(None, None, "val", line=3)


def test_format_detection() -> None:
    assert manifest_format("labels.CSV", b"{") == "csv"
    assert manifest_format("labels.ndjson", b"key") == "jsonl"
    assert manifest_format("labels", b'  {"key": 1}') == "jsonl"
    assert manifest_format("labels", b"key,label") == "csv"


@pytest.mark.parametrize("bad", ["../x.jpg", "/abs/x.jpg", "a/../../b.jpg", "a\\b.jpg"])
def test_escaping_keys_rejected_with_line(bad: str) -> None:
    data = f"key,label\nok.jpg,a\n{bad},b\n".encode()
    with pytest.raises(ManifestError, match=r"m\.csv line 3: .*"):
        parse_manifest(data, "m.csv")


def test_escaping_key_in_jsonl() -> None:
    data = b'{"key": "ok.jpg", "label": "a"}\n{"key": "../etc/passwd", "label": "b"}\n'
    with pytest.raises(ManifestError, match="line 2") as info:
        parse_manifest(data, "m.jsonl")
    assert "escapes" in str(info.value)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("../../etc/passwd", "key escapes the source ('..' or '.' segment)"),
        ("/etc/passwd", "key escapes the source (absolute path; keys are relative to the source)"),
        ("a\\b.jpg", "key is not a valid object key (NUL or backslash)"),
        ('"new\nline.jpg"', "key is not a valid object key (name contains control characters)"),
    ],
)
def test_rows_outside_the_source_are_set_aside(bad: str, reason: str) -> None:
    """With a ``rejected`` list, such a row is set aside with its line; the rest applies."""
    data = f"key,label\nok.jpg,a\n{bad},b\nz.jpg,c\n".encode()
    rejected: list[RejectedRow] = []
    entries = parse_manifest(data, "m.csv", rejected)
    assert sorted(entries) == ["ok.jpg", "z.jpg"]
    assert [(r.line, r.reason) for r in rejected] == [(3, reason)]
    assert "\n" not in rejected[0].key  # printable
    with pytest.raises(ManifestError, match=re.escape(f"m.csv line 3: {reason}")):
        parse_manifest(data, "m.csv")


NOT_A_MANIFEST = [
    b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR secret-token-1234",
    b"\xff\xd8\xff\xe0 JFIF secret-token-1234",
    b"password=secret-token-1234\nkey=value\n",
    b'{"password": "secret-token-1234"}\n',
    b"key,label\nsecret-token-1234,a,b,c\n",
    b'{"key": "secret-token-1234", "label": ["x"]}\n',
]


@pytest.mark.parametrize("data", NOT_A_MANIFEST)
@pytest.mark.parametrize("name", ["m.csv", "m.jsonl", "m"])
def test_errors_never_quote_the_file(data: bytes, name: str) -> None:
    """A file that is not a manifest is refused by line number, never by its content."""
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, name)
    message = str(info.value)
    assert "secret-token" not in message and "root:x" not in message, message
    assert "daemon" not in message and "JFIF" not in message, message
    assert message.startswith(f"manifest {name}")


def test_duplicate_keys_name_all_lines() -> None:
    data = b"key,label\na.jpg,x\nb.jpg,y\na.jpg,z\n./c.jpg,q\n"
    with pytest.raises(ManifestError, match="line 5"):  # '.' segment: rejected first
        parse_manifest(data, "m.csv")
    data = b"key,label\na.jpg,x\nb.jpg,y\na.jpg,z\nb.jpg,w\na.jpg,v\n"
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, "m.csv")
    message = str(info.value)
    assert "'a.jpg' on lines 2, 4, 6" in message
    assert "'b.jpg' on lines 3, 5" in message


def test_duplicate_after_normalisation() -> None:
    with pytest.raises(ManifestError, match="lines 2, 3"):
        parse_manifest(b"key,label\na/b.jpg,x\na//b.jpg,x\n", "m.csv")


def test_missing_header_or_columns() -> None:
    with pytest.raises(ManifestError, match="missing label"):
        parse_manifest(b"key,group\na.jpg,g\n", "m.csv")
    with pytest.raises(ManifestError, match="missing key, label"):
        parse_manifest(b"a.jpg,crazing\n", "m.csv")  # no header row
    with pytest.raises(ManifestError, match="empty"):
        parse_manifest(b"", "m.csv")


def test_jsonl_missing_fields_and_bad_json() -> None:
    with pytest.raises(ManifestError, match="line 2: missing field"):
        parse_manifest(b'{"key": "a", "label": "x"}\n{"key": "b"}\n', "m.jsonl")
    with pytest.raises(ManifestError, match="line 1: invalid JSON"):
        parse_manifest(b'{"key": "a", \n', "m.jsonl")
    with pytest.raises(ManifestError, match="line 1: expected a JSON object"):
        parse_manifest(b'["a", "x"]\n', "m.jsonl")
    with pytest.raises(ManifestError, match="line 1: label must be text"):
        parse_manifest(b'{"key": "a", "label": [1]}\n', "m.jsonl")


def test_bad_rows() -> None:
    with pytest.raises(ManifestError, match="line 3: 3 fields, header has 2"):
        parse_manifest(b"key,label\na,x\nb,y,z\n", "m.csv")
    with pytest.raises(ManifestError, match="line 2: empty or non-text key"):
        parse_manifest(b"key,label\n,x\n", "m.csv")
    with pytest.raises(ManifestError, match="not UTF-8"):
        parse_manifest(b"key,label\n\xff\xfe,x\n", "m.csv")


def test_manifest_errors_are_kiban_errors() -> None:
    assert issubclass(ManifestError, KibanError)


def test_a_label_that_is_not_valid_unicode_sets_its_row_aside() -> None:
    data = b'{"key": "a.png", "label": "\\udcff"}\n{"key": "b.png", "label": "ok"}\n'
    rejected: list = []
    manifest = parse_manifest(data, "m.jsonl", rejected)
    assert set(manifest) == {"b.png"}
    (row,) = rejected
    assert row.line == 1 and "label is not valid Unicode text" in row.reason
    with pytest.raises(ManifestError, match="line 1: label is not valid Unicode"):
        parse_manifest(data, "m.jsonl")
