"""Ingest end to end against real stores: a local folder and SeaweedFS S3.

The source is a small synthetic labelled set with planted bad and awkward files
(``kiban_cli.synthetic.problem_files``); each bad one must be quarantined with its reason,
each awkward one accepted, the duplicate recorded once, and a re-run must change nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kiban.context import Context
from kiban.errors import InvalidMessageError
from kiban.messages import IngestBatch
from kiban.records import (
    BatchInfo,
    batch_prefix,
    read_batch_info,
    read_quarantine,
    read_records,
)
from kiban.settings import Settings, use_settings
from kiban.store import open_store
from kiban_cli.synthetic import encode, generate_texture_dataset, problem_files, sample_images
from kiban_ingest.ingest import MISSING_REASON, ingest_batch
from kiban_ingest.labels import ManifestError

pytestmark = pytest.mark.integration

CLASSES = ["checker", "stripes_coarse", "stripes_fine"]
PER_CLASS = 12
PLANT_IN = "checker"  # planted files sit in a class folder, like real strays do
LOW_MAX_PIXELS = 1_000_000  # the planted 4000×4000 PNG is a bomb under this limit

BAD = {
    f"{PLANT_IN}/truncated.jpg": "truncated or corrupt image data: ",
    f"{PLANT_IN}/empty.jpg": "empty file (0 bytes)",
    f"{PLANT_IN}/notes.jpg": "not an image (unrecognised format)",
    f"{PLANT_IN}/bomb.png": "decompression bomb: 4000×4000 = 16000000 pixels exceeds limit 1000000",
    f"{PLANT_IN}/tiny.png": "image too small: 1×1 (min side 8)",
    f"{PLANT_IN}/readme.txt": "unsupported file type (.txt)",
}
CONVERTED = {  # key -> (width, height) after EXIF orientation
    f"{PLANT_IN}/grey16.tif": (64, 64),
    f"{PLANT_IN}/cmyk.jpg": (64, 64),
    f"{PLANT_IN}/rotated.jpg": (64, 128),  # stored 128×64 with orientation 6
    f"{PLANT_IN}/rgba.png": (64, 64),
}
N_SYNTHETIC = len(CLASSES) * PER_CLASS
N_LISTED = N_SYNTHETIC + len(problem_files()) + 2  # + readme.txt + loose.png
N_ACCEPTED = N_LISTED - len(BAD) - 1  # the duplicate is not a record


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("source")
    generate_texture_dataset(root, n_classes=3, per_class=PER_CLASS, size=64, seed=1)
    for planted in problem_files():
        (root / PLANT_IN / planted.name).write_bytes(planted.data)
    (root / PLANT_IN / "readme.txt").write_text("not for the model\n")
    (root / PLANT_IN / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden: ignored
    loose = sample_images(1, seed=5)[0]
    (root / "loose.jpg").write_bytes(encode(loose, ".jpg"))  # top level: unlabelled
    return root


def make_context(home: Path, **overrides: object) -> Context:
    settings = Settings(home=home, max_image_pixels=LOW_MAX_PIXELS, **overrides)  # type: ignore[arg-type]
    return Context.from_settings(settings)


def batch_files(ctx: Context, batch_id: str) -> dict[str, bytes]:
    prefix = batch_prefix(batch_id)
    return {
        name: ctx.store.get(f"{prefix}/{name}")
        for name in ("records.jsonl", "quarantine.jsonl", "batch.json")
    }


def check_planted_batch(ctx: Context, info: BatchInfo, chunk_size: int) -> None:
    assert info.label_source == "folders"
    assert (info.n_listed, info.n_accepted, info.n_duplicates) == (N_LISTED, N_ACCEPTED, 1)
    assert info.n_quarantined == len(BAD)
    assert info.labelled and info.classes == CLASSES

    quarantine = {q.key: q for q in read_quarantine(ctx.store, info.batch_id)}
    assert sorted(quarantine) == sorted(BAD)
    for key, reason in BAD.items():
        assert quarantine[key].reason.startswith(reason), (key, quarantine[key].reason)
    assert quarantine[f"{PLANT_IN}/empty.jpg"].sha256 == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )

    records = read_records(ctx.store, info.batch_id)
    keys = [r.key for r in records]
    assert keys == sorted(keys) and len(records) == N_ACCEPTED
    by_key = {r.key: r for r in records}
    for key, size in CONVERTED.items():
        assert (by_key[key].width, by_key[key].height) == size, key
        assert by_key[key].label == PLANT_IN
    assert by_key[f"{PLANT_IN}/good-copy.jpg"].duplicates == [f"{PLANT_IN}/good.jpg"]
    assert f"{PLANT_IN}/good.jpg" not in by_key
    assert by_key["loose.jpg"].label is None
    assert len({r.sha256 for r in records}) == len(records)
    assert all(r.key.split("/")[0] == r.label for r in records if r.label)
    assert not any(".DS_Store" in k or k == "manifest.csv" for k in [*keys, *quarantine])

    spans = [(c.index, c.start, c.stop) for c in info.chunks]
    expected = [
        (i, s, min(s + chunk_size, N_ACCEPTED))
        for i, s in enumerate(range(0, N_ACCEPTED, chunk_size))
    ]
    assert spans == expected
    assert read_batch_info(ctx.store, info.batch_id) == info


def test_ingest_local_folder(source_dir: Path, tmp_path: Path) -> None:
    ctx = make_context(tmp_path / "home")
    msg = IngestBatch(batch_id="local", source=source_dir.as_uri(), chunk_size=10)
    info = ingest_batch(msg, ctx)
    check_planted_batch(ctx, info, chunk_size=10)
    first = batch_files(ctx, "local")

    # re-run, same inputs: the fast path returns the same batch, files untouched
    assert ingest_batch(msg, ctx) == info
    assert batch_files(ctx, "local") == first

    # forced full re-run (no fingerprint): same bytes, created_at kept
    time.sleep(1.1)
    ctx.store.delete(f"{batch_prefix('local')}/ingest.json")
    assert ingest_batch(msg, ctx) == info
    assert batch_files(ctx, "local") == first


def test_rerun_after_source_change(source_dir: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source_dir, src)
    ctx = make_context(tmp_path / "home")
    msg = IngestBatch(batch_id="changing", source=src.as_uri(), chunk_size=1000)
    before = ingest_batch(msg, ctx)
    (src / "stripes_fine" / "stripes_fine-0000.jpg").unlink()
    after = ingest_batch(msg, ctx)
    assert after.n_listed == before.n_listed - 1
    assert after.n_accepted == before.n_accepted - 1
    assert len(read_records(ctx.store, "changing")) == after.n_accepted


def test_ingest_with_manifest(source_dir: Path, tmp_path: Path) -> None:
    """Manifest labels and groups; planted files are unlabelled; a ghost key is reported."""
    manifest = tmp_path / "labels.csv"
    text = (source_dir / "manifest.csv").read_text()
    manifest.write_text(text + "checker/ghost.jpg,checker,checker-lot99\n")
    ctx = make_context(tmp_path / "home")
    msg = IngestBatch(batch_id="manifest", source=source_dir.as_uri(), manifest=manifest.as_uri())
    info = ingest_batch(msg, ctx)
    assert info.label_source == "manifest"
    assert info.manifest == manifest.resolve().as_uri()
    assert info.classes == CLASSES
    quarantine = {q.key: q.reason for q in read_quarantine(ctx.store, "manifest")}
    assert quarantine["checker/ghost.jpg"] == MISSING_REASON
    assert info.n_quarantined == len(BAD) + 1
    records = {r.key: r for r in read_records(ctx.store, "manifest")}
    assert records["checker/checker-0003.jpg"].group == "checker-lot03"
    assert records[f"{PLANT_IN}/rgba.png"].label is None  # not in the manifest
    assert records["loose.jpg"].label is None
    assert sum(r.label is not None for r in records.values()) == N_SYNTHETIC


def test_manifest_inside_source_and_relative(source_dir: Path, tmp_path: Path) -> None:
    ctx = make_context(tmp_path / "home")
    for batch_id, manifest in [
        ("rel", "manifest.csv"),
        ("abs", (source_dir / "manifest.csv").as_uri()),
    ]:
        info = ingest_batch(
            IngestBatch(batch_id=batch_id, source=source_dir.as_uri(), manifest=manifest), ctx
        )
        assert info.n_listed == N_LISTED  # the manifest is not a listed file
        assert info.label_source == "manifest"


def test_escaping_manifest_key_is_quarantined(source_dir: Path, tmp_path: Path) -> None:
    """A row naming a key outside the source is set aside with its line; nothing outside the
    source is read and the rest of the manifest applies."""
    (tmp_path / "secrets.jpg").write_bytes(b"not to be read")
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(
        json.dumps({"key": "checker/checker-0000.jpg", "label": "checker"})
        + "\n"
        + json.dumps({"key": "../secrets.jpg", "label": "x"})
        + "\n"
    )
    ctx = make_context(tmp_path / "home")
    msg = IngestBatch(batch_id="bad", source=source_dir.as_uri(), manifest=manifest.as_uri())
    info = ingest_batch(msg, ctx)
    quarantine = {q.key: q.reason for q in read_quarantine(ctx.store, "bad")}
    assert (
        quarantine["../secrets.jpg"]
        == "manifest line 2: key escapes the source ('..' or '.' segment)"
    )
    assert info.classes == ["checker"]
    assert not any(r.key.endswith("secrets.jpg") for r in read_records(ctx.store, "bad"))


def test_missing_manifest_is_clear(source_dir: Path, tmp_path: Path) -> None:
    ctx = make_context(tmp_path / "home")
    msg = IngestBatch(batch_id="m", source=source_dir.as_uri(), manifest="nope.csv")
    with pytest.raises(ManifestError, match="nope.csv.*no object"):
        ingest_batch(msg, ctx)


def test_celery_task_in_process(
    source_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registered task: valid message → BatchInfo JSON; invalid → dead-lettered."""
    from kiban.celery_app import app
    from kiban_ingest.tasks import ingest_batch_task

    assert ingest_batch_task.name == "kiban.ingest.batch" and ingest_batch_task.name in app.tasks
    monkeypatch.setenv("KIBAN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KIBAN_MAX_IMAGE_PIXELS", str(LOW_MAX_PIXELS))
    use_settings(None)
    # apply(): Celery's tracer, as on a worker, so the failure path (dead letter) runs too
    result = ingest_batch_task.apply(
        kwargs={"message": {"batch_id": "task", "source": source_dir.as_uri(), "chunk_size": 10}}
    ).get()
    info = BatchInfo.model_validate(result)
    assert (info.n_accepted, info.n_quarantined) == (N_ACCEPTED, len(BAD))
    bad = ingest_batch_task.apply(
        kwargs={"message": {"batch_id": "../x", "source": source_dir.as_uri()}}
    )
    assert bad.failed() and isinstance(bad.result, InvalidMessageError)
    assert "batch_id" in str(bad.result)
    store = open_store((tmp_path / "home" / "store").as_uri())
    assert any(o.key.startswith("deadletter/") for o in store.list())


def test_ingest_from_s3(source_dir: Path, tmp_path: Path, s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    """Same batch from SeaweedFS, with the kiban store on S3 too: identical records."""
    uploaded = s3_server.upload_folder(source_dir, s3_bucket, prefix="incoming/set1")
    assert uploaded == N_LISTED + 2  # + manifest.csv + .DS_Store
    local = make_context(tmp_path / "local")
    ingest_batch(IngestBatch(batch_id="b", source=source_dir.as_uri(), chunk_size=10), local)

    ctx = make_context(
        tmp_path / "home",
        store_uri=f"s3://{s3_bucket}/kiban",
        s3_endpoint_url=s3_server.endpoint_url,
    )
    msg = IngestBatch(batch_id="b", source=f"s3://{s3_bucket}/incoming/set1", chunk_size=10)
    info = ingest_batch(msg, ctx)
    check_planted_batch(ctx, info, chunk_size=10)
    assert info.source == f"s3://{s3_bucket}/incoming/set1"
    remote_files = batch_files(ctx, "b")
    local_files = batch_files(local, "b")
    assert remote_files["records.jsonl"] == local_files["records.jsonl"]
    assert remote_files["quarantine.jsonl"] == local_files["quarantine.jsonl"]

    # idempotent from S3 too, through the full path
    ctx.store.delete(f"{batch_prefix('b')}/ingest.json")
    assert ingest_batch(msg, ctx) == info
    assert batch_files(ctx, "b") == remote_files

    # the manifest can live in the bucket as well
    with_manifest = IngestBatch(
        batch_id="bm",
        source=f"s3://{s3_bucket}/incoming/set1",
        manifest=f"s3://{s3_bucket}/incoming/set1/manifest.csv",
    )
    info = ingest_batch(with_manifest, ctx)
    assert info.label_source == "manifest" and info.n_listed == N_LISTED


def test_missing_s3_bucket_is_clear(tmp_path: Path, s3_server) -> None:  # type: ignore[no-untyped-def]
    from kiban.errors import StoreError

    ctx = make_context(tmp_path / "home", s3_endpoint_url=s3_server.endpoint_url)
    msg = IngestBatch(batch_id="nob", source="s3://no-such-bucket-kiban/x")
    with pytest.raises(StoreError, match="cannot list s3://no-such-bucket-kiban/x"):
        ingest_batch(msg, ctx)


def test_ingest_neu_subset(neu_dir: Path, tmp_path: Path) -> None:
    """The whole NEU set (1,800 real JPEGs, ~1 s) with a manifest labelling two classes:
    the other classes' files are accepted unlabelled, none is quarantined."""
    classes = sorted(p.name for p in neu_dir.iterdir() if p.is_dir())[:2]
    manifest = tmp_path / "neu.csv"
    lines = ["key,label,group"]
    for cls in classes:
        for i, path in enumerate(sorted((neu_dir / cls).glob("*.jpg"))):
            lines.append(f"{cls}/{path.name},{cls},{cls}-{i // 50}")
    manifest.write_text("\n".join(lines) + "\n")
    ctx = Context.from_settings(Settings(home=tmp_path / "home"))  # default limits
    started = time.perf_counter()
    info = ingest_batch(
        IngestBatch(batch_id="neu", source=neu_dir.as_uri(), manifest=manifest.as_uri()), ctx
    )
    seconds = time.perf_counter() - started
    print(f"NEU: {info.n_listed} listed in {seconds:.2f} s ({info.n_listed / seconds:.0f} img/s)")
    assert info.classes == classes
    records = read_records(ctx.store, "neu")
    labelled = [r for r in records if r.label]
    assert len(labelled) == len(lines) - 1 - sum(len(r.duplicates) for r in labelled)
    assert all(r.width >= 8 and r.height >= 8 for r in records)
    assert info.n_listed == info.n_accepted + info.n_duplicates + info.n_quarantined
    assert info.n_quarantined == 0
    assert all(r.label is None for r in records if r.key.split("/")[0] not in classes)
