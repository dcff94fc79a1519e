"""The encoder's cheaper resize keeps the pixels of the previous preprocessing.

``kiban.imaging`` resamples only the centre crop (Pillow ``box``) and resamples grey content
as one channel. These tests hold it to the previous implementation (resize the whole image
as RGB, then crop): identical on grey content and square images, within rounding elsewhere.
Real JPEG bytes from kiban's synthetic images; no mocks.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiban.imaging import _RESAMPLE, _grey_plane, _resized, decode_for_model, preprocess
from kiban.models.card import Preprocessing
from kiban.records import ImageRecord
from kiban.store import FileStore
from kiban_cli.synthetic import sample_images
from kiban_encoder.reader import decoded_batches

PREP = Preprocessing(
    resize_shorter=256, crop=224, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3
)
NEU = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "neu-det"


def previous(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The preprocessing before this change: RGB, full resize, centre crop."""
    image = image.convert("RGB")
    width, height = image.size
    new_w, new_h = _resized(width, height, prep)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _RESAMPLE[prep.interpolation])
    left, top = (new_w - prep.crop) // 2, (new_h - prep.crop) // 2
    return np.asarray(image.crop((left, top, left + prep.crop, top + prep.crop)), np.uint8)


def jpeg(image: Image.Image, size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").resize(size, Image.Resampling.BICUBIC).convert(mode).save(
        buf, "JPEG", quality=90
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return sample_images(n=4, seed=5)


def crop_resized_rgb(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The crop-only resize done on all three channels (what the grey path must equal)."""
    width, height = image.size
    new_w, new_h = _resized(width, height, prep)
    sx, sy = width / new_w, height / new_h
    left, top = (new_w - prep.crop) // 2, (new_h - prep.crop) // 2
    box = (left * sx, top * sy, (left + prep.crop) * sx, (top + prep.crop) * sy)
    resample = _RESAMPLE[prep.interpolation]
    return np.asarray(image.convert("RGB").resize((prep.crop, prep.crop), resample, box=box))


@pytest.mark.parametrize("size", [(416, 416), (417, 301), (300, 900), (640, 480)])
def test_grey_content_in_colour_jpeg(pictures, size) -> None:  # type: ignore[no-untyped-def]
    for picture in pictures:
        data = jpeg(picture.convert("L"), size)  # stored as a 3-channel JPEG, like NEU
        decoded = Image.open(io.BytesIO(data))
        decoded.load()
        assert decoded.mode == "RGB" and _grey_plane(decoded) is not None
        got = decode_for_model(data, PREP)
        assert got.shape == (224, 224, 3) and got.dtype == np.uint8 and got.flags.writeable
        # one channel resampled = each of the three resampled: identical
        np.testing.assert_array_equal(got, crop_resized_rgb(decoded, PREP))
        want = previous(decoded, PREP).astype(int)
        if size[0] == size[1]:
            np.testing.assert_array_equal(got, want)
        assert np.abs(got.astype(int) - want).max() <= 2


def test_one_channel_jpeg_is_identical_to_its_rgb_conversion(pictures) -> None:  # type: ignore[no-untyped-def]
    data = jpeg(pictures[0], (400, 400), mode="L")  # square: no box rounding
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "L"
    np.testing.assert_array_equal(decode_for_model(data, PREP), previous(decoded, PREP))


def test_colour_images_within_rounding(pictures) -> None:  # type: ignore[no-untyped-def]
    for picture in pictures:
        for size in [(416, 416), (417, 301), (640, 480), (255, 300), (230, 500), (120, 90)]:
            image = picture.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            assert _grey_plane(image) is None
            got = preprocess(image, PREP).astype(int)
            want = previous(image, PREP).astype(int)
            if size[0] == size[1] or min(size) < PREP.resize_shorter:
                np.testing.assert_array_equal(got, want)  # square or upscaled: exact
            assert np.abs(got - want).max() <= 2
            assert np.abs(got - want).mean() < 0.5


def test_reduced_jpeg_decode_still_matches_full_decode(pictures) -> None:  # type: ignore[no-untyped-def]
    data = jpeg(pictures[1], (1000, 760))
    full = decode_for_model(data, PREP, draft=False).astype(int)
    reduced = decode_for_model(data, PREP).astype(int)
    assert np.abs(full - reduced).mean() < 2.0  # the DCT-scaling tolerance, unchanged


def test_colour_pixel_breaks_grey(pictures) -> None:  # type: ignore[no-untyped-def]
    image = pictures[0].convert("L").convert("RGB").resize((300, 300))
    assert _grey_plane(image) is not None
    image.putpixel((5, 7), (10, 11, 10))  # one pixel away from the probed middle row
    assert _grey_plane(image) is None
    np.testing.assert_array_equal(preprocess(image, PREP), previous(image, PREP))


def test_reader_batches_grey_and_colour_with_failures(tmp_path, pictures) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    store = FileStore(tmp_path)
    blobs = {
        "grey.jpg": jpeg(pictures[0].convert("L"), (416, 416)),
        "colour.jpg": jpeg(pictures[1], (500, 400)),
        "broken.jpg": jpeg(pictures[2], (300, 300))[:400],
    }
    records = []
    for key, data in blobs.items():
        store.put(key, data)
        records.append(
            ImageRecord(key=key, sha256=hashlib.sha256(data).hexdigest(), width=1, height=1)
        )
    batches = list(decoded_batches(store, records, PREP, 2, 2, 80_000_000, 8))
    ok = [r.key for b in batches for r in b.records]
    failed = [k for b in batches for k, _ in b.failures]
    assert ok == ["grey.jpg", "colour.jpg"] and failed == ["broken.jpg"]
    pixels = np.concatenate([b.pixels for b in batches if b.records])
    assert pixels.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(pixels[0, :, :, 0], pixels[0, :, :, 2])
    want = previous(Image.open(io.BytesIO(blobs["grey.jpg"])), PREP)
    np.testing.assert_array_equal(pixels[0], want)


@pytest.mark.skipif(not NEU.is_dir(), reason="NEU-DET not present")
def test_neu_images_identical() -> None:
    files = sorted(NEU.glob("*/*.jpg"))[::150]
    for f in files:
        data = f.read_bytes()
        np.testing.assert_array_equal(
            decode_for_model(data, PREP), previous(Image.open(io.BytesIO(data)), PREP)
        )
