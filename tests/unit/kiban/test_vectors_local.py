"""Qdrant local mode: a shard is one SQLite commit, all or nothing, idempotent.

These run the real qdrant-client local mode. The first test also pins the qdrant-client
internals that ``VectorIndex._one_commit`` relies on: if an upgrade moves the collection's
SQLite connection or stops writing each point inside ``with connection:``, it fails here
rather than silently falling back to one commit per point.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiban.settings import Settings
from kiban.vectors import VectorIndex, collection_name

DIM = 8


def _shard(tag: str, n: int) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    shas = [hashlib.sha256(f"{tag}-{i}".encode()).hexdigest() for i in range(n)]
    vecs = np.random.default_rng(len(tag) + n).standard_normal((n, DIM)).astype(np.float32)
    payloads = [{"key": f"k/{tag}-{i}.jpg", "sha256": s, "batch": tag} for i, s in enumerate(shas)]
    return shas, vecs, payloads


def _index(home: Path) -> VectorIndex:
    index = VectorIndex(Settings(home=home))
    index.ensure_collection("m", DIM)
    return index


def test_shard_is_one_commit_and_durable(tmp_path: Path) -> None:
    index = _index(tmp_path)
    persistence = index._local_persistence(collection_name("m"))
    assert persistence is not None, "qdrant-client local internals changed: see kiban.vectors"
    connection = persistence.storage
    assert isinstance(connection, sqlite3.Connection)
    statements: list[str] = []
    connection.set_trace_callback(statements.append)

    shas, vecs, payloads = _shard("b1", 300)
    assert index.upsert("m", shas, vecs, payloads, batch_size=128) == 300  # 3 client calls

    inserts = [s for s in statements if s.startswith("INSERT OR REPLACE INTO points")]
    commits = [s for s in statements if s.strip().upper() == "COMMIT"]
    assert len(inserts) == 300, "qdrant-client no longer persists one row per point"
    assert len(commits) == 1, f"expected one commit per shard, saw {len(commits)}"
    assert persistence.storage is connection  # the real connection is back
    connection.set_trace_callback(None)

    # idempotent: the same images again are the same points
    index.upsert("m", shas, vecs, payloads)
    assert index.count("m") == 300
    index.close()

    reopened = VectorIndex(Settings(home=tmp_path))
    assert reopened.count("m") == 300
    assert reopened.count("m", batch_id="b1") == 300
    assert reopened.payload_batches("m", shas[:5]) == dict.fromkeys(shas[:5], "b1")
    hits = reopened.search("m", vecs[7], limit=1)
    assert hits[0][0] == shas[7]
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    reopened.close()


def test_failed_shard_leaves_memory_and_disk_as_before(tmp_path: Path) -> None:
    index = _index(tmp_path)
    shas, vecs, payloads = _shard("ok", 10)
    index.upsert("m", shas, vecs, payloads)

    bad_shas, bad_vecs, bad_payloads = _shard("bad", 10)
    bad_payloads[6]["unstorable"] = object()  # rejected by qdrant-client in the 2nd call
    with pytest.raises(Exception):  # noqa: B017 - qdrant-client's own error type
        index.upsert("m", bad_shas, bad_vecs, bad_payloads, batch_size=4)

    # the first 4 points of the failed shard were applied in memory, then rolled back
    assert index.count("m") == 10
    assert index.payload_batches("m", bad_shas) == {}
    # the index still works after the rollback, and the retried shard goes in whole
    del bad_payloads[6]["unstorable"]
    index.upsert("m", bad_shas, bad_vecs, bad_payloads, batch_size=4)
    assert index.count("m") == 20
    index.close()
    reopened = VectorIndex(Settings(home=tmp_path))
    assert reopened.count("m") == 20
    reopened.close()


def test_crash_mid_shard_leaves_disk_as_before(tmp_path: Path) -> None:
    """A process killed after part of a shard was written: the file holds none of it."""
    index = _index(tmp_path)
    index.upsert("m", *_shard("ok", 10))
    index.close()

    child = textwrap.dedent(
        f"""
        import hashlib, os, sys
        import numpy as np
        from pathlib import Path
        from kiban.settings import Settings
        from kiban.vectors import VectorIndex

        index = VectorIndex(Settings(home=Path({str(tmp_path)!r})))
        real = index._qdrant.upsert
        calls = []

        def upsert_then_die(*args, **kwargs):
            if calls:
                os._exit(3)  # killed between two calls: 4 points written, not committed
            calls.append(1)
            return real(*args, **kwargs)

        index._qdrant.upsert = upsert_then_die
        shas = [hashlib.sha256(f"crash-{{i}}".encode()).hexdigest() for i in range(8)]
        vecs = np.ones((8, {DIM}), dtype=np.float32)
        index.upsert("m", shas, vecs, [{{"batch": "crash"}}] * 8, batch_size=4)
        sys.exit(0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr

    reopened = VectorIndex(Settings(home=tmp_path))
    assert reopened.count("m") == 10
    assert reopened.count("m", batch_id="crash") == 0
    reopened.close()


def test_unexpected_internals_fall_back_to_per_point_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = _index(tmp_path)
    name = collection_name("m")
    collection = index._qdrant._client.collections[name]
    real = collection.storage

    class Unknown:  # a persistence without the expected ``storage`` connection
        def __getattr__(self, attr: str) -> Any:
            if attr == "storage":
                raise AttributeError(attr)
            return getattr(real, attr)

    collection.storage = Unknown()
    with caplog.at_level(logging.WARNING, logger="kiban.vectors"):
        assert index._local_persistence(name) is None
        index.upsert("m", *_shard("x", 5))
    assert "commits once per point" in caplog.text
    collection.storage = real
    assert index.count("m") == 5
    index.close()
    assert VectorIndex(Settings(home=tmp_path)).count("m") == 5
