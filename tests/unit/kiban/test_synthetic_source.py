"""The synthetic:// source: its URI grammar, a listing that is sorted, cheap and exact about
sizes, the same bytes for a key on every read and in every process, images that pass
ingest's validation, the read-only refusals, and where distributed mode allows it."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tracemalloc
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kiban.synthetic_source as synthetic
from kiban.errors import ForbiddenLocationError, ObjectTooLargeError, StoreError
from kiban.imaging import decode_for_model, validate_image
from kiban.locations import check_location
from kiban.models.card import Preprocessing
from kiban.settings import Settings
from kiban.store import open_store
from kiban.synthetic_source import (
    SyntheticSpec,
    SyntheticStore,
    object_size,
    parse_synthetic_uri,
)

SMALL = "synthetic://textures?n=10&classes=3&size=32"
PREP = Preprocessing(resize_shorter=40, crop=32, mean=[0.5] * 3, std=[0.25] * 3)


# --- the URI grammar ----------------------------------------------------------------------


def test_defaults_and_canonical_uri() -> None:
    spec = parse_synthetic_uri("synthetic://textures?n=1000")
    assert spec == SyntheticSpec("textures", 1000, 8, 224, "jpeg", 0)
    assert spec.uri == "synthetic://textures?n=1000&classes=8&size=224&format=jpeg&seed=0"
    assert parse_synthetic_uri(spec.uri) == spec  # what ingest records re-opens the same source
    other = parse_synthetic_uri("synthetic://textures/?seed=7&format=png&size=64&classes=5&n=9")
    assert other == SyntheticSpec("textures", 9, 5, 64, "png", 7)


@pytest.mark.parametrize(
    ("uri", "named"),
    [
        ("synthetic://textures", "'n'"),
        ("synthetic://textures?classes=3", "'n'"),
        ("synthetic://textures?n=0", "'n'"),
        ("synthetic://textures?n=100000001", "'n'"),
        ("synthetic://textures?n=1e6", "'n'"),
        ("synthetic://textures?n=1_000", "'n'"),
        ("synthetic://textures?n=-5", "'n'"),
        ("synthetic://textures?n=", "'n'"),
        ("synthetic://textures?n=5&classes=8", "'n' (5) must be at least 'classes' (8)"),
        ("synthetic://textures?n=100&classes=1", "'classes'"),
        ("synthetic://textures?n=100000&classes=1001", "'classes'"),
        ("synthetic://textures?n=100&size=15", "'size'"),
        ("synthetic://textures?n=100&size=1025", "'size'"),
        ("synthetic://textures?n=100&format=gif", "'format'"),
        ("synthetic://textures?n=100&format=JPEG", "'format'"),
        ("synthetic://textures?n=100&seed=4294967296", "'seed'"),
        ("synthetic://textures?n=100&clases=3", "unknown parameter 'clases'"),
        ("synthetic://textures?n=100&n=200", "'n' given twice"),
        ("synthetic://textures?n=100&size", "name=value"),
        ("synthetic://noise?n=100", "unknown generator 'noise'"),
        ("synthetic://textures/c000?n=100", "no path"),
        ("synthetic://textures?n=100#x", "no path"),
    ],
)
def test_bad_parameters_are_one_error_naming_them(uri: str, named: str) -> None:
    with pytest.raises(StoreError) as info:
        open_store(uri)
    assert named in str(info.value)
    assert str(info.value).startswith(f"synthetic source {uri!r}: ")


def test_open_store_gives_the_synthetic_store_with_the_read_bound() -> None:
    store = open_store(SMALL, max_object_bytes=12345)
    assert isinstance(store, SyntheticStore)
    assert store.max_object_bytes == 12345
    assert store.uri == "synthetic://textures?n=10&classes=3&size=32&format=jpeg&seed=0"


# --- listing ------------------------------------------------------------------------------


def test_listing_is_sorted_complete_and_labelled_by_folder() -> None:
    store = open_store(SMALL)
    listing = list(store.list())
    keys = [o.key for o in listing]
    assert keys == sorted(keys) == sorted(keys, key=lambda k: k.encode())  # S3 byte order too
    assert len(keys) == len(set(keys)) == 10
    assert [k for k in keys if k.startswith("c000/")] == [
        "c000/00000000.jpg",
        "c000/00000001.jpg",
        "c000/00000002.jpg",
        "c000/00000003.jpg",
    ]  # 10 images dealt to 3 classes: 4, 3, 3
    assert [sum(k.startswith(f"c00{c}/") for k in keys) for c in range(3)] == [4, 3, 3]
    assert all(store.exists(k) for k in keys)


def test_listing_by_prefix_is_a_folder_or_one_key() -> None:
    store = open_store(SMALL)
    assert [o.key for o in store.list("c001")] == [f"c001/0000000{i}.jpg" for i in range(3)]
    assert [o.key for o in store.list("c001/")] == [o.key for o in store.list("c001")]
    assert [o.key for o in store.list("c002/00000002.jpg")] == ["c002/00000002.jpg"]
    assert list(store.list("c003")) == []  # only 3 classes
    assert list(store.list("c002/00000003.jpg")) == []  # class 2 holds 3 images
    assert list(store.list("c00")) == []  # not a folder (like FileStore and S3Store)
    with pytest.raises(StoreError):
        list(store.list("../c000"))


def test_listing_is_a_generator_in_constant_memory() -> None:
    store = open_store("synthetic://textures?n=200000&classes=7&size=224")
    listing = store.list()
    assert isinstance(listing, types.GeneratorType)
    tracemalloc.start()
    try:
        count, last = 0, ""
        for info in listing:
            assert info.key > last
            count, last = count + 1, info.key
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000
    assert peak < 200_000  # bytes: a few objects at a time, never the whole listing


def test_a_key_outside_the_source_is_not_there() -> None:
    store = open_store(SMALL)
    for key in (
        "c000/00000004.jpg",  # class 0 holds 4
        "c003/00000000.jpg",  # 3 classes
        "c000/00000000.png",  # the source is jpeg
        "c000/0000000.jpg",  # not zero-padded to 8
        "c0/00000000.jpg",
        "c000/00000000.jpg/x",
        "other.jpg",
    ):
        assert not store.exists(key), key
        with pytest.raises(StoreError, match="no object"):
            store.get(key)
    assert not store.exists("../c000/00000000.jpg")


# --- the objects --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        "size=16",
        "size=32",
        "size=224&classes=12",
        "size=97&classes=9&seed=3",
        "size=16&format=png",
        "size=64&format=png&classes=10",
        "size=224&format=png",
    ],
)
def test_every_object_has_its_listed_size_and_passes_ingest(params: str) -> None:
    store = open_store(f"synthetic://textures?n=48&{params}")
    listing = list(store.list())
    sizes = {o.size for o in listing}
    assert sizes == {object_size(store.spec)}  # every object the same size
    for info in listing[::3] if store.spec.size < 200 else listing[::12]:
        data = store.get(info.key)
        assert len(data) == info.size
        width, height = validate_image(data)
        assert (width, height) == (store.spec.size, store.spec.size)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == ("PNG" if store.spec.format == "png" else "JPEG")
            assert image.mode == "RGB"
            image.load()
        crop = decode_for_model(data, PREP)
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
        assert info.key.encode() in data  # the padding names the key: no two objects alike


def test_png_padding_is_a_valid_private_chunk() -> None:
    data = open_store("synthetic://textures?n=4&classes=2&size=32&format=png").get(
        "c001/00000001.png"
    )
    length = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"kbPd"
    body = data[41 : 41 + length]
    assert body.startswith(b"kiban synthetic c001/00000001.png ")
    crc = int.from_bytes(data[41 + length : 45 + length], "big")
    assert crc == zlib.crc32(b"kbPd" + body)
    assert data[45 + length + 4 : 45 + length + 8] == b"IDAT"


def test_the_same_bytes_on_every_read_and_the_images_differ() -> None:
    store = open_store("synthetic://textures?n=40&classes=4&size=48")
    keys = [o.key for o in store.list()]
    first = {k: hashlib.sha256(store.get(k)).hexdigest() for k in keys}
    again = {k: hashlib.sha256(open_store(store.uri).get(k)).hexdigest() for k in keys[::-1]}
    assert first == again
    assert len(set(first.values())) == len(keys)
    pixels = [np.asarray(Image.open(io.BytesIO(store.get(k)))) for k in keys[:10]]
    assert all(not np.array_equal(a, b) for i, a in enumerate(pixels) for b in pixels[i + 1 :])
    reseeded = open_store("synthetic://textures?n=40&classes=4&size=48&seed=1")
    assert hashlib.sha256(reseeded.get(keys[0])).hexdigest() != first[keys[0]]


def test_a_key_names_the_same_image_whatever_n() -> None:
    small = open_store("synthetic://textures?n=6&classes=3&size=32")
    large = open_store("synthetic://textures?n=600&classes=3&size=32")
    for info in small.list():
        assert small.get(info.key) == large.get(info.key)


def test_the_same_bytes_in_another_process() -> None:
    uri = "synthetic://textures?n=30&classes=10&size=64"
    keys = ["c000/00000000.jpg", "c004/00000002.jpg", "c009/00000001.jpg"]
    code = (
        "import hashlib, json, sys\n"
        "from kiban.store import open_store\n"
        "s = open_store(sys.argv[1])\n"
        "print(json.dumps([hashlib.sha256(s.get(k)).hexdigest() for k in sys.argv[2:]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, uri, *keys],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    store = open_store(uri)
    assert json.loads(out.stdout) == [hashlib.sha256(store.get(k)).hexdigest() for k in keys]


def test_classes_beyond_the_families_differ_in_colour() -> None:
    """Class 8 repeats family 0 with a tint of its own: the mean colours tell them apart."""
    store = open_store("synthetic://textures?n=180&classes=9&size=32")

    def mean_colour(class_index: int) -> np.ndarray:
        images = [
            np.asarray(Image.open(io.BytesIO(store.get(o.key))), dtype=np.float64)
            for o in store.list(f"c{class_index:03d}")
        ]
        return np.mean([im.reshape(-1, 3).mean(axis=0) for im in images], axis=0)

    chroma = [mean_colour(c) - mean_colour(c).mean() for c in (0, 8)]
    assert np.abs(chroma[0] - chroma[1]).max() > 5.0  # grey levels on 0..255


def test_a_jpeg_over_its_bound_is_reencoded_to_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_synthetic_uri("synthetic://textures?n=8&classes=8&size=64")
    normal = synthetic.render_object(spec, 7, 0)
    monkeypatch.setattr(synthetic, "JPEG_BYTES_PER_PIXEL", 0.2)  # below quality 90's size
    tight = synthetic.render_object(spec, 7, 0)
    assert len(tight) == object_size(spec) < len(normal)
    assert validate_image(tight) == (64, 64)
    monkeypatch.setattr(synthetic, "JPEG_BYTES_PER_PIXEL", 0.0)
    monkeypatch.setattr(synthetic, "JPEG_FIXED_BYTES", 700)  # nothing fits: an error, not junk
    with pytest.raises(StoreError, match="does not fit its size bound"):
        synthetic.render_object(spec, 7, 0)


# --- bounds and refusals ------------------------------------------------------------------


def test_max_bytes_is_honoured_before_rendering() -> None:
    store = open_store(SMALL)
    size = store.object_size
    assert len(store.get("c000/00000000.jpg", max_bytes=size)) == size
    with pytest.raises(ObjectTooLargeError) as info:
        store.get("c000/00000000.jpg", max_bytes=size - 1)
    assert info.value.reason == f"too large: more than {size - 1} bytes (KIBAN_MAX_OBJECT_BYTES)"
    bounded = open_store(SMALL, max_object_bytes=size - 1)
    with pytest.raises(ObjectTooLargeError):
        bounded.get("c000/00000000.jpg")


def test_a_synthetic_source_is_read_only() -> None:
    store = open_store(SMALL)
    with pytest.raises(StoreError, match="read-only"):
        store.put("c000/00000000.jpg", b"x")
    with pytest.raises(StoreError, match="read-only"):
        store.delete("c000/00000000.jpg")
    assert store.exists("c000/00000000.jpg")


# --- where distributed mode allows it -----------------------------------------------------


def test_distributed_mode_allows_a_synthetic_source_unless_turned_off(tmp_path: Path) -> None:
    on = Settings(mode="distributed", allowed_roots=[str(tmp_path)])
    assert check_location(SMALL, on, "source") == SMALL
    for what in ("manifest", "export destination"):
        with pytest.raises(ForbiddenLocationError, match="only be an image source"):
            check_location(SMALL, on, what)
    off = Settings(mode="distributed", allow_synthetic_sources=False)
    with pytest.raises(ForbiddenLocationError, match="KIBAN_ALLOW_SYNTHETIC_SOURCES"):
        check_location(SMALL, off, "source")
    embedded = Settings(mode="embedded", allow_synthetic_sources=False)
    assert check_location(SMALL, embedded, "source") == SMALL  # a person's own command line


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIBAN_ALLOW_SYNTHETIC_SOURCES", "false")
    assert Settings().allow_synthetic_sources is False


# --- one generator ------------------------------------------------------------------------


def test_the_demo_writes_with_the_shared_generator() -> None:
    from kiban_cli import synthetic as demo

    assert demo.render is synthetic.render
    assert demo.encode is synthetic.encode
    assert demo.FAMILIES is synthetic.FAMILIES
    assert demo.make_lot is synthetic.make_lot


# --- the sizing command -------------------------------------------------------------------


def test_the_sizing_command_prints_listing_and_rendering_rates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    synthetic.main(["synthetic://textures?n=500&classes=5&size=32", "--render", "20"])
    figures = json.loads(capsys.readouterr().out)
    assert figures["uri"] == "synthetic://textures?n=500&classes=5&size=32&format=jpeg&seed=0"
    assert figures["keys"] == 500 and figures["rendered"] == 20
    assert figures["bytes_listed"] == 500 * figures["object_bytes"]
    assert figures["keys_per_second"] > 0 and figures["images_per_second"] > 0


def test_the_sizing_command_names_a_bad_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        synthetic.main(["synthetic://textures?n=500&size=8"])
    assert info.value.code == 2
    assert "parameter 'size'" in capsys.readouterr().err
