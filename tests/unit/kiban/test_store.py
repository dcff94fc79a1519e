"""FileStore and key safety: the embedded default object store."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kiban.errors import ObjectRefusedError, ObjectTooLargeError, StoreError
from kiban.store import (
    FileStore,
    ObjectInfo,
    join_key,
    key_problem,
    open_store,
    printable_key,
    read_bounded,
    safe_key,
)


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


# --- hostile sources: only regular files beneath the root, bounded reads ---------------


def _fifo_socket_links(root: Path, outside: Path) -> None:
    """A source with every kind of entry that is not a plain file inside it."""
    import socket

    (root / "cls").mkdir(parents=True)
    (root / "cls" / "a.jpg").write_bytes(b"inside")
    outside.write_bytes(b"secret outside the source")
    os.mkfifo(root / "cls" / "fifo.jpg")
    (root / "cls" / "out.jpg").symlink_to(outside)
    (root / "cls" / "zero.jpg").symlink_to("/dev/zero")
    (root / "cls" / "in.jpg").symlink_to("a.jpg")
    (root / "cls" / "dangling.jpg").symlink_to("nope.jpg")
    (root / "cls" / "loop.jpg").symlink_to("loop.jpg")
    (root / "cls" / "dirlink").symlink_to(root / "cls")
    sock = socket.socket(socket.AF_UNIX)
    cwd = Path.cwd()
    os.chdir(root / "cls")  # AF_UNIX paths are short: bind relative to the folder
    try:
        sock.bind("sock.jpg")
    finally:
        os.chdir(cwd)
        sock.close()


LISTED_PROBLEMS = {
    "cls/fifo.jpg": "not a regular file (named pipe (FIFO)): not opened",
    "cls/sock.jpg": "not a regular file (socket): not opened",
    "cls/out.jpg": "symbolic link to a path outside the source: not followed",
    "cls/zero.jpg": "symbolic link to a path outside the source: not followed",
    "cls/dangling.jpg": "dangling symbolic link",
    "cls/loop.jpg": "symbolic link loop: not followed",
    "cls/dirlink": "symbolic link to a folder: not followed",
}


def test_listing_marks_every_non_regular_entry(tmp_path: Path) -> None:
    _fifo_socket_links(tmp_path / "src", tmp_path / "secret.jpg")
    store = FileStore(tmp_path / "src")
    listed = {o.key: o for o in store.list()}
    assert listed["cls/a.jpg"] == ObjectInfo("cls/a.jpg", 6)
    assert listed["cls/in.jpg"] == ObjectInfo("cls/in.jpg", 6)  # a link inside: followed
    assert {k: o.problem for k, o in listed.items() if o.problem} == LISTED_PROBLEMS


@pytest.mark.timeout(20)
def test_get_refuses_without_opening_or_hanging(tmp_path: Path) -> None:
    _fifo_socket_links(tmp_path / "src", tmp_path / "secret.jpg")
    store = FileStore(tmp_path / "src")
    assert store.get("cls/in.jpg") == b"inside"
    assert store.get("cls/dirlink/a.jpg") == b"inside"  # a folder link inside: read there
    for key in ["cls/fifo.jpg", "cls/sock.jpg", "cls/out.jpg", "cls/zero.jpg", "cls/loop.jpg"]:
        with pytest.raises(ObjectRefusedError) as info:
            store.get(key)
        assert info.value.reason == LISTED_PROBLEMS[key], key
        assert not store.exists(key)
    with pytest.raises(StoreError, match="no object"):
        store.get("cls/dangling.jpg")


def test_device_file_is_never_opened(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    try:
        os.mknod(tmp_path / "src" / "zero.jpg", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD (tests run unprivileged)")
    store = FileStore(tmp_path / "src")
    assert [o.problem for o in store.list()] == [
        "not a regular file (character device): not opened"
    ]
    with pytest.raises(ObjectRefusedError, match="character device"):
        store.get("zero.jpg")


def test_writes_and_deletes_never_go_through_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"keep")
    store = FileStore(tmp_path / "root")
    store.put("x", b"1")
    (store.root / "team").symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link"):
        store.put("team/report.json", b"{}")
    with pytest.raises(StoreError, match="symbolic link"):
        store.delete("team/keep.txt")
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    (store.root / "link.json").symlink_to(outside / "keep.txt")
    store.put("link.json", b"replaced")  # replaces the link itself, never its target
    assert (outside / "keep.txt").read_bytes() == b"keep"
    assert store.get("link.json") == b"replaced"


class _CountingReader:
    def __init__(self, size: int) -> None:
        self.size, self.served = size, 0

    def read(self, n: int) -> bytes:
        n = min(n, self.size - self.served)
        self.served += n
        return b"x" * n


@pytest.mark.parametrize(("size", "limit"), [(0, 10), (10, 10), (11, 10), (10**9, 4096)])
def test_read_bounded_reads_at_most_limit_plus_one(size: int, limit: int) -> None:
    reader = _CountingReader(size)
    if size > limit:
        with pytest.raises(ObjectTooLargeError, match=f"more than {limit} bytes"):
            read_bounded(reader.read, limit, "x")
        assert reader.served == limit + 1
    else:
        assert read_bounded(reader.read, limit, "x") == b"x" * size


@pytest.mark.timeout(20)
def test_get_is_bounded_while_streaming(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root", max_object_bytes=1024)
    store.put("big.bin", b"x" * 1025)
    store.put("ok.bin", b"x" * 1024)
    assert len(store.get("ok.bin")) == 1024
    with pytest.raises(ObjectTooLargeError, match="KIBAN_MAX_OBJECT_BYTES"):
        store.get("big.bin")
    assert len(store.get("big.bin", max_bytes=2048)) == 1025
    # a file that grows after its size was checked is still cut at the limit
    (store.root / "zero-link.bin").symlink_to("/dev/zero")
    with pytest.raises(ObjectRefusedError):
        store.get("zero-link.bin")


def test_odd_names_are_listed_as_problems(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    for raw in [b"a/bad\xff.jpg", b"a/new\nline.jpg", b"a/back\\slash.jpg", b"a/esc\x1b[31m.jpg"]:
        (root / os.fsdecode(raw)).write_bytes(b"x")  # surrogateescape: the bytes as named
    (root / os.fsdecode(b"bad-dir\xfe")).mkdir()
    (root / "a" / "[bold]ok<script>.jpg").write_bytes(b"x")  # markup is just text
    listed = {o.key: o.problem for o in FileStore(root).list()}
    assert listed == {
        "a/[bold]ok<script>.jpg": None,
        "a/back\\slash.jpg": "name contains a backslash",
        "a/bad\\xff.jpg": "name is not valid UTF-8",
        "a/esc\\x1b[31m.jpg": "name contains control characters",
        "a/new\\nline.jpg": "name contains control characters",
        "bad-dir\\xfe/": "folder name is not valid UTF-8: not listed",
    }
    for key in listed:
        key.encode()  # every key is representable text


def without_dac_override() -> list[str]:
    """A command prefix under which chmod 000 denies access, even when tests run as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: chmod 000 is no bar")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]


def test_unreadable_subfolder_and_file_do_not_abort(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "x.jpg").write_bytes(b"x")
    (root / "secret.jpg").write_bytes(b"s")
    (root / "ok.jpg").write_bytes(b"y")
    (root / "locked").chmod(0)
    (root / "secret.jpg").chmod(0)
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from kiban.store import FileStore\n"
        "s = FileStore(Path(sys.argv[1]))\n"
        "out = {}\n"
        "for o in s.list():\n"
        "    try:\n"
        "        out[o.key] = o.problem or s.get(o.key).decode()\n"
        "    except Exception as exc:\n"
        "        out[o.key] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run(
            [*without_dac_override(), sys.executable, "-c", script, str(root)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        (root / "locked").chmod(0o755)
        (root / "secret.jpg").chmod(0o644)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert listed["locked/"] == "cannot list folder: Permission denied"
    assert listed["ok.jpg"] == "y"
    assert listed["secret.jpg"].startswith("StoreError: cannot read 'secret.jpg'")
    assert listed["secret.jpg"].endswith("Permission denied")
    assert len(listed) == 3


def test_key_problem_and_printable_key() -> None:
    assert key_problem("a/b.jpg") is None
    assert key_problem("a//b.jpg") == "name is not a normal key (empty or '.' segments)"
    assert key_problem("../b.jpg") == "name is not a relative key ('.', '..' or absolute)"
    assert key_problem("a" * 1025) == "name longer than 1024 bytes"
    assert key_problem("a\u0085b") == "name contains control characters"
    assert printable_key("x\udcff\n\u0085") == "x\\xff\\n\\x85"


def test_open_store_reports_an_uncreatable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StoreError, match="cannot create the directory"):
        open_store((tmp_path / "file" / "sub").as_uri(), create=True)


def test_a_store_not_written_to_yet_lists_nothing(tmp_path: Path) -> None:
    assert list(FileStore(tmp_path / "not-yet").list()) == []
    assert not FileStore(tmp_path / "not-yet").exists("x")
