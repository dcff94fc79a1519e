"""Duplicate images with conflicting labels, and quarantine reasons as metric categories."""

from __future__ import annotations

import pytest

from kiban.records import BatchInfo, KeyLabel
from kiban_ingest.ingest import Inspected, Manifest, _records
from kiban_ingest.labels import LabelEntry
from kiban_ingest.metrics import reason_category


def item(key: str, sha: str) -> Inspected:
    return Inspected(key, sha, 10, 10)


def test_first_key_keeps_its_label_and_the_others_are_recorded() -> None:
    accepted = [
        item("zeta/1.jpg", "a"),  # listed order does not matter: code-point order does
        item("Alpha/1.jpg", "a"),
        item("beta/1.jpg", "a"),
        item("Alpha/2.jpg", "b"),
        item("Alpha/3.jpg", "b"),  # same label: a duplicate, not a conflict
        item("top.jpg", "c"),
        item("gamma/x.jpg", "c"),  # unlabelled vs labelled is a conflict too
    ]
    records, n_duplicates, conflicts = _records(accepted, None)
    assert [r.key for r in records] == ["Alpha/1.jpg", "Alpha/2.jpg", "gamma/x.jpg"]
    assert n_duplicates == 4
    assert [(c.sha256, c.kept, c.dropped) for c in conflicts] == [
        ("a", KeyLabel(key="Alpha/1.jpg", label="Alpha"), [
            KeyLabel(key="beta/1.jpg", label="beta"),
            KeyLabel(key="zeta/1.jpg", label="zeta"),
        ]),
        ("c", KeyLabel(key="gamma/x.jpg", label="gamma"), [KeyLabel(key="top.jpg", label=None)]),
    ]  # fmt: skip
    assert records[0].label == "Alpha"


def test_manifest_labels_decide_conflicts() -> None:
    manifest = Manifest(
        "m.csv",
        b"",
        None,
        {"a.jpg": LabelEntry("x"), "b.jpg": LabelEntry("y"), "c.jpg": LabelEntry("x")},
    )
    _, _, conflicts = _records(
        [item("b.jpg", "s"), item("a.jpg", "s"), item("c.jpg", "s")], manifest
    )
    (conflict,) = conflicts
    assert conflict.kept == KeyLabel(key="a.jpg", label="x")
    assert conflict.dropped == [KeyLabel(key="b.jpg", label="y")]


def test_old_batch_json_still_reads() -> None:
    info = BatchInfo.model_validate(
        {
            "batch_id": "b",
            "source": "file:///x",
            "label_source": "folders",
            "n_listed": 0,
            "n_accepted": 0,
            "n_quarantined": 0,
            "n_duplicates": 0,
            "labelled": False,
            "classes": [],
            "chunks": [],
            "created_at": "2026-01-01T00:00:00+00:00",
        }
    )
    assert info.n_label_conflicts == 0 and info.label_conflicts == []


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("not a regular file (named pipe (FIFO)): not opened", "not_regular_file"),
        ("symbolic link to a path outside the source: not followed", "link"),
        ("dangling symbolic link", "link"),
        ("too large: more than 1024 bytes (KIBAN_MAX_OBJECT_BYTES)", "too_large"),
        ("name is not valid UTF-8", "bad_name"),
        ("folder name is not valid UTF-8: not listed", "bad_name"),
        ("cannot list folder: Permission denied", "unreadable"),
        ("cannot read object: x", "unreadable"),
        ("manifest line 3: key escapes the source ('..' or '.' segment)", "manifest_row"),
        ("listed in manifest but not found in source", "missing"),
    ],
)
def test_reason_categories(reason: str, category: str) -> None:
    assert reason_category(reason) == category
