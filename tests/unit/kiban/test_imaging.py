"""decode_image: every bad input is rejected with its reason, every odd-but-valid one
becomes 8-bit RGB with the right pixels. All images are generated here, in memory.

Every case also checks the cheaper paths against it: ``validate_image`` (ingest: 1/8-scale
JPEG decode) must reject with the identical reason and report the same size, and
``decode_for_model`` (encoder: reduced-size JPEG decode) must reject identically."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from kiban.imaging import (
    ImageRejected,
    decode_for_model,
    decode_image,
    preprocess,
    validate_image,
)
from kiban.models.card import Preprocessing

PREP = Preprocessing(resize_shorter=256, crop=224, mean=[0.5] * 3, std=[0.5] * 3)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for headers Pillow would never write (bombs, 16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def rgb(data: bytes, **kwargs: int) -> np.ndarray:
    image = decode_image(data, **kwargs)
    assert validate_image(data, **kwargs) == image.size
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    return array


def reason_of(data: bytes, **kwargs: int) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **kwargs)
    for cheaper in (validate_image, lambda d, **kw: decode_for_model(d, PREP, **kw)):
        with pytest.raises(ImageRejected) as other:
            cheaper(data, **kwargs)
        assert other.value.reason == info.value.reason
    return info.value.reason


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


# --- rejected -------------------------------------------------------------------------


def test_zero_bytes() -> None:
    assert reason_of(b"") == "empty file (0 bytes)"


def test_text_file_named_jpg() -> None:
    text = b"id,label\n1,scratch\nthis is a CSV, not a picture\n" * 4
    assert reason_of(text) == "not an image (unrecognised format)"


def test_truncated_jpeg(photo_jpeg: bytes) -> None:
    reason = reason_of(photo_jpeg[: len(photo_jpeg) // 2])
    assert reason.startswith("truncated or corrupt image data: ")


def test_truncated_png() -> None:
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    assert reason_of(data[:60]).startswith("truncated or corrupt image data: ")


def test_corrupt_jpeg_header() -> None:
    data = b"\xff\xd8\xff\xe0" + b"\x00" * 200
    reason = reason_of(data)
    assert reason.startswith(("truncated or corrupt image data", "not an image"))


def test_decompression_bomb_forged_header() -> None:
    """A 100000×100000 header over a few bytes of data: refused before decoding."""
    bomb = raw_png(100_000, 100_000, 8, 2, b"\x00" * 16)
    assert reason_of(bomb) == (
        "decompression bomb: 100000×100000 = 10000000000 pixels exceeds limit 80000000"
    )


def test_decompression_bomb_when_pillow_warnings_are_errors() -> None:
    """Under ``-W error`` Pillow raises its 89 Mpx warning from open(); same verdict."""
    bomb = raw_png(10_000, 10_000, 8, 0, b"\x00" * 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert reason_of(bomb) == (
            "decompression bomb: 10000×10000 = 100000000 pixels exceeds limit 80000000"
        )


def test_decompression_bomb_genuine_low_limit() -> None:
    """A real 3000×3000 PNG that compresses to a few kB, against a 1 Mpx limit."""
    data = encode(Image.new("L", (3000, 3000), 0), "PNG")
    assert len(data) < 50_000
    assert reason_of(data, max_pixels=1_000_000) == (
        "decompression bomb: 3000×3000 = 9000000 pixels exceeds limit 1000000"
    )


def test_one_pixel_image() -> None:
    data = encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")
    assert reason_of(data) == "image too small: 1×1 (min side 8)"


def test_thin_image_respects_min_side() -> None:
    data = encode(Image.new("RGB", (200, 5), (9, 9, 9)), "PNG")
    assert reason_of(data, min_side=8) == "image too small: 200×5 (min side 8)"
    assert decode_image(data, min_side=5).size == (200, 5)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_unsupported_format(fmt: str) -> None:
    data = encode(Image.new("RGB", (32, 32), (255, 0, 0)), fmt)
    assert reason_of(data) == (f"unsupported image format {fmt} (accepted: JPEG, PNG, TIFF, BMP)")


# --- accepted and converted -----------------------------------------------------------


def test_plain_rgb_jpeg_round_trips(photo_jpeg: bytes) -> None:
    array = rgb(photo_jpeg)
    assert array.shape == (96, 128, 3)


def test_sixteen_bit_tiff_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    array = rgb(encode(Image.fromarray(ramp), "TIFF"))
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.abs(array[..., 0].astype(int) - expected).max() <= 1
    assert array[..., 0].max() == 255 and array[..., 0].min() == 0
    assert (array[..., 0] == array[..., 2]).all()
    # clipping (what convert("L") does) would make most of the ramp white
    assert (array[..., 0] == 255).mean() < 0.01


def test_sixteen_bit_grey_png() -> None:
    grey = np.full((32, 32), 257 * 100, np.uint16)
    grey[:16] = 65535
    data = encode(Image.fromarray(grey), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    array = rgb(data)
    assert (array[16:] == 100).all() and (array[:16] == 255).all()


def test_sixteen_bit_rgb_png() -> None:
    pixels = np.zeros((16, 16, 3), np.uint16)
    pixels[..., 0] = 65535
    pixels[..., 1] = 257 * 128
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(16))
    array = rgb(raw_png(16, 16, 16, 2, rows))
    assert np.abs(array.astype(int) - [255, 128, 0]).max() <= 1


def test_cmyk_jpeg_to_rgb() -> None:
    """Pillow writes (and reads) Adobe-marked inverted CMYK JPEGs; red must stay red."""
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    cmyk.paste((0, 0, 0, 255), (0, 16, 32, 32))  # bottom half black ink
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    array = rgb(data).astype(int)
    assert np.abs(array[4, 4] - [255, 0, 0]).max() <= 6
    assert array[28, 4].max() <= 6


def test_rgba_png_composited_on_white() -> None:
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[..., 0] = 255  # red everywhere
    pixels[:8, :, 3] = 255  # opaque top half
    pixels[8:, :, 3] = 0  # transparent bottom half
    array = rgb(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    assert (array[:8] == [255, 0, 0]).all()
    assert (array[8:] == [255, 255, 255]).all()


def test_half_transparent_blends() -> None:
    data = encode(Image.new("RGBA", (16, 16), (0, 0, 0, 128)), "PNG")
    assert np.abs(rgb(data).astype(int) - 127).max() <= 1


def test_grey_alpha_png() -> None:
    data = encode(Image.new("LA", (16, 16), (40, 255)), "PNG")
    assert (rgb(data) == 40).all()


def test_palette_png_with_transparency() -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))
    array = rgb(encode(image, "PNG", transparency=0))
    assert (array[:, :8] == [200, 100, 50]).all()  # opaque palette entry 1
    assert (array[:, 8:] == [255, 255, 255]).all()  # entry 0 is transparent


def test_palette_png_without_transparency() -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([10, 20, 30] + [0] * 765)
    assert (rgb(encode(image, "PNG")) == [10, 20, 30]).all()


def test_grey_jpeg() -> None:
    data = encode(Image.new("L", (32, 32), 77), "JPEG", quality=95)
    assert np.abs(rgb(data).astype(int) - 77).max() <= 2


def test_bmp() -> None:
    data = encode(Image.new("RGB", (20, 10), (1, 2, 250)), "BMP")
    assert (rgb(data) == [1, 2, 250]).all()


def test_exif_orientation_six_rotates() -> None:
    """Orientation 6: stored 40 wide × 20 high, shown rotated 90° clockwise."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white in the stored pixels
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.size == (20, 40)
    array = np.asarray(decoded).astype(int)
    assert array[:18].mean() > 240  # the stored left half is now on top
    assert array[22:].mean() < 15


def test_multi_frame_tiff_uses_first_frame() -> None:
    first = Image.new("RGB", (32, 32), (10, 20, 30))
    second = Image.new("RGB", (32, 32), (200, 200, 200))
    data = encode(first, "TIFF", save_all=True, append_images=[second])
    assert (rgb(data) == [10, 20, 30]).all()


def test_float_tiff_in_unit_range() -> None:
    data = encode(Image.fromarray(np.full((16, 16), 0.5, np.float32)), "TIFF")
    assert np.abs(rgb(data).astype(int) - 128).max() <= 1


def test_decoded_image_is_independent_of_input_buffer(photo_jpeg: bytes) -> None:
    buf = bytearray(photo_jpeg)
    image = decode_image(bytes(buf))
    buf[:] = b"\x00" * len(buf)
    assert np.asarray(image).std() > 10


# --- reduced-size JPEG decoding (encoder) and 1/8-scale validation (ingest) -------------


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shapes + edges + mild noise: closer to a photo or micrograph than white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(2, 12, 2) * 2 * np.pi
        base[..., c] = 128 + 60 * np.sin(fx * x / width + fy * y / height + c)
    for _ in range(12):  # hard-edged discs
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def jpeg_with(image: Image.Image, orientation: int = 1, **kwargs: object) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif.tobytes(), **kwargs)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference in grey levels, cosine of the mean-centred pixels)."""
    fa, fb = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    fa, fb = fa - fa.mean(), fb - fb.mean()
    return float(np.abs(a.astype(int) - b).mean()), float(
        fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)
    )


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("size", [(600, 520), (1023, 769), (2001, 1499)])
def test_reduced_decode_matches_full_decode(size: tuple[int, int], orientation: int) -> None:
    """Tolerance: mean |diff| <= 2 grey levels and pixel cosine >= 0.99 (measured on these:
    <= 1.4 and >= 0.999). In embedding terms (EfficientNet-Lite0, bench/bench_decode.py):
    cosine >= 0.99 on photo-like images, >= 0.98 worst case on high-frequency synthetic
    textures. Every EXIF orientation and sizes that are not multiples of the DCT scale
    are covered: a wrong transpose fails the pixel cosine by a wide margin."""
    data = jpeg_with(photo_like(*size, seed=orientation), orientation)
    full = preprocess(decode_image(data), PREP)
    reduced = decode_for_model(data, PREP)
    assert reduced.shape == full.shape == (224, 224, 3)
    mad, cos = agreement(full, reduced)
    assert mad <= 2.0, (mad, cos)
    assert cos >= 0.99, (mad, cos)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_reduced_decode_grey_and_cmyk(mode: str) -> None:
    data = encode(photo_like(1024, 800).convert(mode), "JPEG", quality=90)
    full = preprocess(decode_image(data), PREP)
    reduced = decode_for_model(data, PREP)
    mad, cos = agreement(full, reduced)
    assert mad <= 2.0 and cos >= 0.99, (mad, cos)


def test_reduced_decode_uses_smallest_scale_still_large_enough(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import JpegImagePlugin

    seen: list[tuple[int, int]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # type: ignore[no-untyped-def]
        result = draft(self, mode, size)
        seen.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    decode_for_model(jpeg_with(photo_like(2100, 1100)), PREP)  # 1100 // 256 = 4 -> 1/4
    decode_for_model(jpeg_with(photo_like(600, 520)), PREP)  # 520 // 256 = 2 -> 1/2
    decode_for_model(jpeg_with(photo_like(500, 500)), PREP)  # < 2 x 256: full decode
    assert seen == [(525, 275), (300, 260)]


def test_small_images_and_png_take_the_full_decode_unchanged() -> None:
    for data in (
        jpeg_with(photo_like(416, 416)),  # NEU size: 416 < 2 x 256
        encode(photo_like(1024, 800), "PNG"),
        encode(photo_like(1024, 800), "TIFF"),
    ):
        assert (decode_for_model(data, PREP) == preprocess(decode_image(data), PREP)).all()
        assert (decode_for_model(data, PREP, draft=False) == decode_for_model(data, PREP)).all()


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_or_corrupt_large_jpeg_same_reason_everywhere(progressive: bool) -> None:
    """1/8-scale decoding still entropy-decodes every block: truncation and broken data are
    caught by validate_image (ingest) exactly as by the full decode, with the same reason."""
    data = jpeg_with(photo_like(2000, 1500), progressive=progressive)
    rng = np.random.default_rng(1)
    cases = [data[: int(len(data) * f)] for f in (0.05, 0.5, 0.95)] + [data[:-2]]
    for _ in range(6):
        broken = bytearray(data)
        at = int(rng.integers(len(data) // 4, len(data) - 100))
        broken[at : at + 32] = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
        cases.append(bytes(broken))
    truncated = 0
    for case in cases:
        try:
            expected: object = decode_image(case).size
        except ImageRejected as exc:
            expected = exc.reason
            truncated += exc.reason.startswith("truncated or corrupt image data")
        try:
            got: object = validate_image(case)
        except ImageRejected as exc:
            got = exc.reason
        assert got == expected
    assert truncated >= 4  # at least every truncation is caught


def test_hostile_corpus_same_verdicts_at_ingest_size() -> None:
    synthetic = pytest.importorskip("kiban_cli.synthetic")
    for planted in synthetic.problem_files(size=1024):
        try:
            expected: object = decode_image(planted.data).size
        except ImageRejected as exc:
            expected = exc.reason
        try:
            got: object = validate_image(planted.data)
        except ImageRejected as exc:
            got = exc.reason
        assert got == expected, planted.name


def test_validate_reports_oriented_full_size() -> None:
    data = jpeg_with(photo_like(1200, 700), orientation=6)
    assert validate_image(data) == decode_image(data).size == (700, 1200)
