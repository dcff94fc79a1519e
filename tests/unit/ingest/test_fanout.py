"""Ingest in pages: key-order listing, the reducer's order and de-duplication across pages,
work stealing, idempotent re-runs — on real images in a real folder store."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from kiban.context import Context
from kiban.errors import StoreError
from kiban.messages import IngestBatch
from kiban.records import (
    KeyLabel,
    batch_prefix,
    read_chunk_records,
    read_quarantine,
    read_records,
)
from kiban.settings import Settings
from kiban.store import FileStore, ObjectInfo, open_store, put_file
from kiban_cli.synthetic import encode, sample_images
from kiban_ingest.ingest import ingest_batch
from kiban_ingest.pages import Claims, validate_page
from kiban_ingest.planner import plan_ingest
from kiban_ingest.reducer import Reducer
from kiban_ingest.run_files import validated_key

IMAGES = [encode(image, ".png") for image in sample_images(6, seed=3)]


def write(root: Path, key: str, data: bytes) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Duplicates spanning pages, label conflicts across pages, a stray file, a keys whose
    string order differs from "files before folders" (a.png < a/…)."""
    root = tmp_path / "source"
    write(root, "a.png", IMAGES[0])
    write(root, "a/1.png", IMAGES[1])
    write(root, "a/2.png", IMAGES[0])  # same bytes as a.png (unlabelled): a label conflict
    write(root, "a0/x.png", IMAGES[2])
    write(root, "b/1.png", IMAGES[3])
    write(root, "b/2.png", IMAGES[1])  # duplicate of a/1.png, other label: conflict
    write(root, "b/3.txt", b"notes")
    write(root, "b/4.png", b"\x89PNG\r\n\x1a\n broken")
    write(root, "c/1.png", IMAGES[4])
    write(root, "c/2.png", IMAGES[3])  # duplicate of b/1.png, pages apart
    write(root, "c/3.png", IMAGES[5])
    write(root, "d/1.png", IMAGES[1])  # a third key of the same bytes
    return root


def context(home: Path, **settings: object) -> Context:
    return Context.from_settings(Settings(home=home, **settings))  # type: ignore[arg-type]


def outputs(ctx: Context, batch_id: str) -> dict[str, bytes]:
    prefix = batch_prefix(batch_id)
    files = {
        name: ctx.store.get(f"{prefix}/{name}") for name in ("records.jsonl", "quarantine.jsonl")
    }
    info = json.loads(ctx.store.get(f"{prefix}/batch.json"))
    info.pop("created_at")
    files["batch.json"] = json.dumps(info, sort_keys=True).encode()
    for plan in info["chunks"]:
        key = f"{prefix}/chunks/chunk-{plan['index']:05d}.jsonl"
        files[key] = ctx.store.get(key)
    return files


def test_a_folder_lists_in_key_order(tmp_path: Path) -> None:
    keys = ["a.jpg", "a/b.jpg", "a-b.jpg", "a0.jpg", "a/c/d.jpg", "a/c.jpg", "b/c/d/e.jpg", "Z.jpg"]
    for key in keys:
        write(tmp_path, key, b"x")
    listed = [o.key for o in FileStore(tmp_path).list()]
    assert listed == sorted(keys)
    assert listed.index("a.jpg") < listed.index("a/b.jpg") < listed.index("a0.jpg")


def test_pages_give_the_outputs_of_one_page(source: Path, tmp_path: Path) -> None:
    msg = IngestBatch(batch_id="b", source=source.as_uri(), chunk_size=2)
    one = context(tmp_path / "one", ingest_page_size=1000)
    paged = context(tmp_path / "paged", ingest_page_size=2)
    info = ingest_batch(msg, paged)
    ingest_batch(msg, one)
    assert outputs(paged, "b") == outputs(one, "b")
    pages = [o.key for o in paged.store.list("batches/b/ingest/pages")]
    assert len(pages) == 6  # 12 entries, 2 per page

    records = read_records(paged.store, "b")
    by_key = {r.key: r for r in records}
    assert [r.key for r in records] == [
        "a.png",
        "a/1.png",
        "a0/x.png",
        "b/1.png",
        "c/1.png",
        "c/3.png",
    ]
    assert by_key["a.png"].duplicates == ["a/2.png"]  # kept key = first in key order
    assert by_key["a/1.png"].duplicates == ["b/2.png", "d/1.png"]  # found pages later
    assert by_key["b/1.png"].duplicates == ["c/2.png"]
    assert info.n_duplicates == 4 and info.n_accepted == 6
    assert info.classes == ["a", "a0", "b", "c"]
    assert [(c.kept, c.dropped) for c in info.label_conflicts] == [
        (KeyLabel(key="a.png", label=None), [KeyLabel(key="a/2.png", label="a")]),
        (KeyLabel(key="a/1.png", label="a"), [
            KeyLabel(key="b/2.png", label="b"), KeyLabel(key="d/1.png", label="d"),
        ]),
        (KeyLabel(key="b/1.png", label="b"), [KeyLabel(key="c/2.png", label="c")]),
    ]  # fmt: skip
    quarantine = read_quarantine(paged.store, "b")
    assert [q.key for q in quarantine] == ["b/3.txt", "b/4.png"]
    # a chunk written before its records' duplicates were found is rewritten at the end
    for plan in info.chunks:
        assert read_chunk_records(paged.store, "b", plan.index) == records[plan.start : plan.stop]


def test_manifest_rows_missing_and_rejected_merge_into_key_order(
    source: Path, tmp_path: Path
) -> None:
    (source / "labels.csv").write_text(
        "key,label,group\na.png,x,g1\nb/1.png,y,g2\nzz/missing.png,z,g3\n0-missing.png,q,g4\n"
        "../escape.png,x,g5\n"
    )
    ctx = context(tmp_path / "home", ingest_page_size=3)
    msg = IngestBatch(batch_id="m", source=source.as_uri(), manifest="labels.csv", chunk_size=4)
    ingest_batch(msg, ctx)
    keys = [q.key for q in read_quarantine(ctx.store, "m")]
    assert keys == sorted(keys)
    assert {"zz/missing.png", "0-missing.png", "../escape.png"} <= set(keys)
    assert "labels.csv" not in keys  # the manifest is not an image
    one = context(tmp_path / "one", ingest_page_size=1000)
    ingest_batch(msg, one)
    assert outputs(ctx, "m") == outputs(one, "m")


def test_a_rerun_reuses_validated_pages_without_reading_an_image(
    source: Path, tmp_path: Path
) -> None:
    ctx = context(tmp_path / "home", ingest_page_size=3)
    msg = IngestBatch(batch_id="r", source=source.as_uri(), chunk_size=2)
    first = ingest_batch(msg, ctx)
    before = outputs(ctx, "r")
    assert ingest_batch(msg, ctx) == first  # unchanged inputs: the stored batch, untouched
    # Force a redo and make every image unreadable garbage of the same size: the pages have
    # the same fingerprint, so their stored results are used and no image is read.
    ctx.store.delete(f"{batch_prefix('r')}/ingest.json")
    for path in source.rglob("*.png"):
        path.write_bytes(b"\0" * path.stat().st_size)
    again = ingest_batch(msg, ctx)
    assert outputs(ctx, "r") == before
    assert again.created_at == first.created_at  # same outputs: same batch.json


def test_unordered_listing_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "src"
    for key in ("a.png", "b.png"):
        write(root, key, IMAGES[0])

    def backwards(self: FileStore, prefix: str = "") -> object:
        return iter([ObjectInfo("b.png", 10), ObjectInfo("a.png", 10)])

    monkeypatch.setattr(FileStore, "list", backwards)
    with pytest.raises(StoreError, match="not in ascending key order"):
        ingest_batch(IngestBatch(batch_id="u", source=root.as_uri()), context(tmp_path / "h"))


class FakeClaims(Claims):
    """Pages held by another (imaginary) worker: pure claim bookkeeping, no Redis."""

    def __init__(self, held: dict[int, str]) -> None:
        self.client = None
        self.held = held

    def claim(self, batch_id: str, run: str, page: int, me: str) -> str | None:
        holder = self.held.setdefault(page, me)
        return None if holder == me else holder


def test_the_reducer_steals_unclaimed_pages_and_waits_for_claimed_ones(
    source: Path, tmp_path: Path
) -> None:
    ctx = context(tmp_path / "home", ingest_page_size=2)
    msg = IngestBatch(batch_id="w", source=source.as_uri(), chunk_size=2)
    sent: list[int] = []
    planned = plan_ingest(msg, ctx, lambda run, page: sent.append(page))
    assert planned.run is not None and sent == list(range(6))
    run = planned.run

    # page 1: claimed by a worker that delivers after a moment; page 3: by one that died
    def worker() -> None:
        time.sleep(0.5)
        assert validate_page(ctx, "w", run, 1, "worker-1") == "validated"

    held = {1: "worker-1", 3: "dead-worker"}
    thread = threading.Thread(target=worker)
    thread.start()
    chunks: list[int] = []
    reducer = Reducer(ctx, "w", run, 2, FakeClaims(held), chunks.append, page_wait=1.0)
    started = time.monotonic()
    info = reducer.run_all()
    thread.join()
    assert info is not None
    assert reducer.stolen == 5  # every page but the one the live worker validated
    assert time.monotonic() - started >= 1.0  # it did wait for the dead worker's page
    assert sorted(chunks) == [c.index for c in info.chunks]  # each chunk sent once
    one = context(tmp_path / "one")
    ingest_batch(msg, one)
    assert outputs(ctx, "w") == outputs(one, "w")
    assert validate_page(ctx, "w", run, 4, "late") == "done before"  # idempotent


def test_a_superseded_run_stops(source: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path / "home", ingest_page_size=4)
    msg = IngestBatch(batch_id="s", source=source.as_uri())
    old = plan_ingest(msg, ctx)
    new = plan_ingest(msg, ctx)
    assert old.run != new.run and old.run is not None
    assert Reducer(ctx, "s", old.run, 256).run_all() is None
    assert validate_page(ctx, "s", old.run, 0, "w") == "superseded"
    assert not ctx.store.exists(validated_key("s", 1))


def test_store_streams_a_file(tmp_path: Path) -> None:
    store = open_store((tmp_path / "s").as_uri(), create=True)
    path = tmp_path / "big.bin"
    path.write_bytes(b"0123456789" * 300_000)
    put_file(store, "x/y.bin", path)
    assert store.get("x/y.bin") == path.read_bytes()
