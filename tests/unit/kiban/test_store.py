"""FileStore and key safety: the embedded default object store."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiban.errors import StoreError
from kiban.store import FileStore, ObjectInfo, join_key, open_store, safe_key


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "root")


def test_put_get_exists_delete(store: FileStore) -> None:
    store.put("a/b/c.bin", b"hello")
    assert store.get("a/b/c.bin") == b"hello"
    assert store.exists("a/b/c.bin")
    assert not store.exists("a/b")  # a "directory" is not an object
    store.put("a/b/c.bin", b"replaced")
    assert store.get("a/b/c.bin") == b"replaced"
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")
    store.delete("a/b/c.bin")  # deleting twice is fine


def test_missing_key_is_store_error(store: FileStore) -> None:
    with pytest.raises(StoreError, match="no object 'nope.txt'"):
        store.get("nope.txt")


def test_put_leaves_no_temp_files(store: FileStore) -> None:
    store.put("x.bin", b"1")
    assert [p.name for p in store.root.iterdir()] == ["x.bin"]


def test_list_relative_and_skips_hidden(store: FileStore) -> None:
    """Keys are relative to the root; order is walk order (callers sort, as ingest does)."""
    for key in ["b/2.jpg", "a/1.jpg", "a/sub/3.jpg", "top.png", ".hidden/x.jpg", "a/.dot.jpg"]:
        store.put(key, key.encode())
    assert sorted(store.list(), key=lambda o: o.key) == [
        ObjectInfo("a/1.jpg", 7),
        ObjectInfo("a/sub/3.jpg", 11),
        ObjectInfo("b/2.jpg", 7),
        ObjectInfo("top.png", 7),
    ]
    assert sorted(o.key for o in store.list("a")) == ["a/1.jpg", "a/sub/3.jpg"]
    assert [o.key for o in store.list("top.png")] == ["top.png"]
    assert list(store.list("missing")) == []


@pytest.mark.parametrize(
    "bad", ["../x", "/abs", "a/../../b", "a\\b", "..", "a/./b", "", "a\x00b", "a/.."]
)
def test_safe_key_rejects(bad: str) -> None:
    with pytest.raises(StoreError):
        safe_key(bad)


def test_store_refuses_escaping_keys(store: FileStore, tmp_path: Path) -> None:
    for bad in ["../outside.txt", "/etc/passwd", "a/../../outside.txt", "a\\..\\x"]:
        with pytest.raises(StoreError):
            store.put(bad, b"x")
        with pytest.raises(StoreError):
            store.get(bad)
    assert not (tmp_path / "outside.txt").exists()


def test_safe_key_normalises() -> None:
    assert safe_key("a//b/c.jpg") == "a/b/c.jpg"
    assert safe_key("a/b/") == "a/b"
    assert join_key("batches/", "/b1/", "records.jsonl") == "batches/b1/records.jsonl"


def test_open_store_file_uri(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such directory"):
        open_store((tmp_path / "nope").as_uri())
    store = open_store((tmp_path / "new").as_uri(), create=True)
    store.put("k", b"v")
    assert (tmp_path / "new" / "k").read_bytes() == b"v"
    assert open_store(str(tmp_path / "new")).get("k") == b"v"  # plain path
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="missing bucket"):
        open_store("s3:///prefix")
