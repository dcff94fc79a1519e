"""The reducer's de-duplication store: records by sha256 in an on-disk SQLite database.

On disk, so that the reducer's memory is bounded by SQLite's page cache (``SQLITE_CACHE_KIB``)
however many images the night has; ``ingest._records`` de-duplicates a plain list with the
same class, so both paths keep the same records, duplicates and label conflicts.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiban.records import ImageRecord, KeyLabel, LabelConflict, QuarantineEntry
from kiban_ingest.pages import PageResult

#: SQLite page cache of the reducer (KiB): the database lives on disk, this is what it keeps.
SQLITE_CACHE_KIB = 16 * 1024


SCHEMA = """
CREATE TABLE records (seq INTEGER PRIMARY KEY, key TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    label TEXT, grp TEXT, split TEXT, width INTEGER, height INTEGER);
CREATE TABLE dups (id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, key TEXT NOT NULL, label TEXT);
CREATE INDEX dups_sha ON dups (sha256);
CREATE TABLE quarantine (id INTEGER PRIMARY KEY, key TEXT NOT NULL, rank INTEGER NOT NULL,
    reason TEXT NOT NULL, sha256 TEXT);
CREATE TABLE classes (label TEXT PRIMARY KEY);
CREATE TABLE dirty (chunk INTEGER PRIMARY KEY);
"""


class Dedup:
    """Records in key order, de-duplicated by sha256, in an on-disk SQLite database.

    ``add`` must be called in ascending key order: a sha256's first key is then kept for good
    the moment it is added. SQLite orders TEXT by its UTF-8 bytes, which is code-point order —
    Python's string order — for every key and label kiban accepts (no lone surrogates).
    """

    def __init__(self, folder: Path, chunk_size: int) -> None:
        self.db = sqlite3.connect(folder / "ingest.sqlite", isolation_level=None)
        self.db.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.executescript(SCHEMA)
        self.db.execute("BEGIN")
        self.chunk_size = chunk_size
        self.n_records = 0
        self.written = 0  # records [0, written) are in chunk files already
        self.unreadable = False

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("COMMIT")
        self.db.close()

    def add_record(self, row: dict[str, Any]) -> None:
        found = self.db.execute(
            "SELECT seq, label FROM records WHERE sha256 = ?", (row["sha256"],)
        ).fetchone()
        if found is None:
            self.db.execute(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.n_records,
                    row["key"],
                    row["sha256"],
                    row.get("label"),
                    row.get("group"),
                    row.get("split"),
                    row["width"],
                    row["height"],
                ),
            )
            if row.get("label") is not None:
                self.db.execute("INSERT OR IGNORE INTO classes VALUES (?)", (row["label"],))
            self.n_records += 1
            return
        self.db.execute(
            "INSERT INTO dups (sha256, key, label) VALUES (?, ?, ?)",
            (row["sha256"], row["key"], row.get("label")),
        )
        if found[0] < self.written:  # its chunk file is out of date now
            self.db.execute(
                "INSERT OR IGNORE INTO dirty VALUES (?)", (found[0] // self.chunk_size,)
            )

    def add_quarantine(self, key: str, rank: int, reason: str, sha256: str | None) -> None:
        self.db.execute(
            "INSERT INTO quarantine (key, rank, reason, sha256) VALUES (?, ?, ?, ?)",
            (key, rank, reason, sha256),
        )

    def add_page(self, result: PageResult) -> None:
        for row in result.rows:
            if "reason" in row:
                self.add_quarantine(row["key"], row["rank"], row["reason"], row.get("sha256"))
            else:
                self.add_record(row)
        self.unreadable = self.unreadable or result.unreadable

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[ImageRecord]:
        """Records [start, stop) in key order, each with its duplicates (so far)."""
        stop = self.n_records if stop is None else stop
        cursor = self.db.execute(
            "SELECT r.seq, r.key, r.sha256, r.label, r.grp, r.split, r.width, r.height, d.key "
            "FROM records r LEFT JOIN dups d ON d.sha256 = r.sha256 "
            "WHERE r.seq >= ? AND r.seq < ? ORDER BY r.seq, d.id",
            (start, stop),
        )
        current: list[Any] | None = None
        dups: list[str] = []
        for row in cursor:
            if current is None or row[0] != current[0]:
                if current is not None:
                    yield _record(current, dups)
                current, dups = list(row), []
            if row[8] is not None:
                dups.append(row[8])
        if current is not None:
            yield _record(current, dups)

    def quarantine(self) -> Iterator[QuarantineEntry]:
        cursor = self.db.execute(
            "SELECT key, reason, sha256 FROM quarantine ORDER BY key, rank, id"
        )
        for key, reason, sha256 in cursor:
            yield QuarantineEntry(key=key, reason=reason, sha256=sha256)

    def n_duplicates(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM dups").fetchone()[0])

    def n_quarantined(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])

    def classes(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT label FROM classes ORDER BY label")]

    def dirty_chunks(self) -> list[int]:
        return [row[0] for row in self.db.execute("SELECT chunk FROM dirty ORDER BY chunk")]

    def conflicts(self, limit: int) -> tuple[list[LabelConflict], int]:
        """The first ``limit`` label conflicts by kept key, and how many there are."""
        where = (
            "FROM records r WHERE EXISTS (SELECT 1 FROM dups d "
            "WHERE d.sha256 = r.sha256 AND d.label IS NOT r.label)"
        )
        total = int(self.db.execute(f"SELECT COUNT(*) {where}").fetchone()[0])
        conflicts = []
        rows = self.db.execute(
            f"SELECT r.sha256, r.key, r.label {where} ORDER BY r.seq LIMIT ?", (limit,)
        ).fetchall()
        for sha256, key, label in rows:
            dropped = [
                KeyLabel(key=k, label=lab)
                for k, lab in self.db.execute(
                    "SELECT key, label FROM dups WHERE sha256 = ? AND label IS NOT ? ORDER BY id",
                    (sha256, label),
                )
            ]
            conflicts.append(
                LabelConflict(sha256=sha256, kept=KeyLabel(key=key, label=label), dropped=dropped)
            )
        return conflicts, total


def _record(row: list[Any], dups: list[str]) -> ImageRecord:
    return ImageRecord(
        key=row[1],
        sha256=row[2],
        label=row[3],
        group=row[4],
        split=row[5],
        width=row[6],
        height=row[7],
        duplicates=dups,
    )
