"""Decoding and preprocessing shared by ingest (validation), encoder and export (parity).

One implementation on purpose: the pixels the exporter checks parity on are produced by
the same code that feeds the encoder in production.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageChops, ImageOps, UnidentifiedImageError

from kiban.models.card import Preprocessing

SUPPORTED_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

# Pillow format names that decode_image accepts. MPO is how Pillow names a JPEG that
# carries extra (preview/stereo) pictures; the first frame is an ordinary JPEG.
_PUBLIC_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")
ACCEPTED_FORMATS = frozenset((*_PUBLIC_FORMATS, "MPO"))
_OPEN_FORMATS = ["JPEG", "PNG", "TIFF", "BMP"]
# Plugins without a magic number: a "match" on arbitrary bytes means nothing.
_LOOSE_FORMATS = frozenset(("TGA", "MPEG", "PCD", "XVTHUMB", "FTEX", "SUN", "SPIDER"))

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class ImageRejected(Exception):  # noqa: N818 - public name used by every service
    """The bytes are not a usable image; ``reason`` is recorded in the quarantine list."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = 80_000_000, min_side: int = 8) -> Image.Image:
    """Fully decode ``data`` into an RGB image with EXIF orientation applied.

    Raises ImageRejected with a human-readable reason for anything unusable: empty or
    truncated files, non-images, decompression bombs, tiny images. Grey, CMYK, 16-bit
    and alpha images are converted to 8-bit RGB.

    Order matters: the format and the header size are checked *before* any pixel is
    decoded, so a bomb costs a header parse, not gigabytes. Only the accepted formats'
    parsers ever see the bytes fully (fewer parsers exposed to untrusted input).
    Truncated files are never padded (``LOAD_TRUNCATED_IMAGES`` stays off): a half
    image would silently poison the embeddings.
    """
    image = _open_checked(data, max_pixels, min_side)
    with _decoding(image.size):
        image.load()
        image = _apply_orientation(image)
        return to_rgb8(image)


def validate_image(data: bytes, max_pixels: int = 80_000_000, min_side: int = 8) -> tuple[int, int]:
    """Check ``data`` as ingest must, return the (width, height) ``decode_image`` would give.

    Rejects exactly what ``decode_image`` rejects, with the same reasons, but a JPEG is
    decoded at 1/8 scale (libjpeg DCT scaling, ``Image.draft``) instead of in full.
    That is still a proof of integrity, not a header glance: at every DCT scale libjpeg
    Huffman/arithmetic-decodes every coefficient of every block of every scan (the AC
    coefficients a reduced IDCT does not need are decoded and skipped, since the
    bitstream cannot be parsed otherwise), and every marker is processed. So a
    truncated file, a broken entropy-coded segment or marker (anything libjpeg treats as
    an error) fails here exactly as in the full decode, and EXIF orientation and the mode
    conversion run on the small image. Only the final inverse DCT and colour conversion
    run at 1/8 size, and no decoder finds bad *pixels* that decode without error in either
    case. PNG, TIFF and BMP are fully decoded: PNG has no reduced decode (zlib must
    inflate every row, and that is most of the cost), TIFF may hold any codec, so only a
    full decode proves the data.
    """
    image = _open_checked(data, max_pixels, min_side)
    width, height = image.size
    with _decoding((width, height)):
        if image.format in _DRAFT_FORMATS:
            image.draft("RGB", (1, 1))  # smallest DCT scale (1/8) the size allows
        stored = image.size
        image.load()
        image = _apply_orientation(image)
        if image.size != stored:  # orientations 5-8 swap the axes
            width, height = height, width
        to_rgb8(image).close()
    return width, height


def decode_for_model(
    data: bytes,
    prep: Preprocessing,
    max_pixels: int = 80_000_000,
    min_side: int = 8,
    draft: bool = True,
) -> np.ndarray:
    """``preprocess(decode_image(data), prep)``, decoding a large JPEG at reduced size.

    When the JPEG's shorter side is at least twice the size the resize needs
    (``max(resize_shorter, crop)``), libjpeg decodes it at the smallest DCT scale (1/2,
    1/4 or 1/8) whose shorter side is still >= that size, and the same resize maps the
    same source rectangle (the box ``draft`` reports, so a size that is not a multiple
    of the scale maps exactly) to the same output size, in the stored orientation;
    the EXIF transpose and the centre crop follow (without a transpose, only the crop is
    resampled, as in ``preprocess``). Rejections and reasons are those of
    ``decode_image`` (the same header checks on the full size; the data is entropy-decoded
    in full). The pixels differ from the full decode only by the reduced IDCT's
    filtering (a reduced IDCT, then the same resize). Tolerance, measured with
    EfficientNet-Lite0 embeddings, full vs reduced: cosine >= 0.99 on photo-like images
    and upscaled NEU (mean ~0.999), >= 0.98 worst case on kiban's synthetic high-frequency
    textures (mean ~0.998); pixels within a mean 2 grey levels
    (``tests/unit/kiban/test_imaging.py``; ``bench/bench_decode.py`` prints the cosines).
    Everything else (PNG, TIFF, BMP, small JPEGs, ``draft=False``)
    takes the full decode.
    """
    image = _open_checked(data, max_pixels, min_side)
    target = max(prep.resize_shorter, prep.crop)
    if not draft or image.format not in _DRAFT_FORMATS or min(image.size) < 2 * target:
        return preprocess(_finish(image, keep_grey=True), prep)
    full_w, full_h = image.size
    with _decoding((full_w, full_h)):
        result = image.draft("RGB", (target, target))
    if result is None or image.size == (full_w, full_h):
        return preprocess(_finish(image, keep_grey=True), prep)
    box = result[1]
    with _decoding((full_w, full_h)):
        image.load()
        orientation = _orientation(image)
        image = to_rgb8(image)
    swap = orientation in (5, 6, 7, 8)
    width, height = (full_h, full_w) if swap else (full_w, full_h)
    new_w, new_h = _resized(width, height, prep)
    stored_size = (new_h, new_w) if swap else (new_w, new_h)
    method = _TRANSPOSE.get(orientation)
    if method is None:  # stored orientation: resize only the crop, as preprocess does
        return _resize_crop(image, box, new_w, new_h, prep)
    image = image.resize(stored_size, _RESAMPLE[prep.interpolation], box=box)
    return _crop(image.transpose(method), new_w, new_h, prep)


_DRAFT_FORMATS = frozenset(("JPEG", "MPO"))
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _open_checked(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """Header parse plus the size checks: nothing is decoded yet."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    image = _open(data)
    width, height = image.size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageRejected(
            f"decompression bomb: {width}×{height} = {pixels} pixels exceeds limit {max_pixels}"
        )
    if min(width, height) < min_side:
        raise ImageRejected(f"image too small: {width}×{height} (min side {min_side})")
    return image


class _decoding:  # noqa: N801 - used as a statement-like context manager
    """Map any decoder failure on untrusted bytes to the reason decode_image has always given."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> Literal[False]:
        if exc is None or isinstance(exc, ImageRejected) or not isinstance(exc, Exception):
            return False
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageRejected(f"decompression bomb: {exc}") from None
        if isinstance(exc, MemoryError):
            width, height = self.size
            raise ImageRejected(
                f"decompression bomb: out of memory decoding {width}×{height}"
            ) from None
        raise ImageRejected(f"truncated or corrupt image data: {_describe(exc)}") from None


def _finish(image: Image.Image, keep_grey: bool = False) -> Image.Image:
    """Load, orient, convert to RGB; ``keep_grey``: an 8-bit grey image stays "L" (what
    ``to_rgb8`` would give is its three equal channels, and ``preprocess`` handles "L")."""
    with _decoding(image.size):
        image.load()
        image = _apply_orientation(image)
        if keep_grey and image.mode == "L" and "transparency" not in image.info:
            return image
        return to_rgb8(image)


def _finish_loaded(image: Image.Image) -> Image.Image:
    image.load()
    return to_rgb8(_apply_orientation(image))


def _orientation(image: Image.Image) -> int:
    """The EXIF Orientation value _apply_orientation would act on (1 if unreadable)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if value in _TRANSPOSE else 1


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open(data: bytes) -> Image.Image:
    """Parse the header with the accepted formats' plugins only; name what else it is."""
    image: Image.Image | None
    try:
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # (the warning is raised only where warnings are errors, e.g. python -W error)
        # Pillow refuses > 2 * Image.MAX_IMAGE_PIXELS inside open() before we see the
        # size; re-parse the header without its check so our own limit (and message
        # with W×H) applies, and a deliberately raised max_pixels is honoured.
        image = _open_unchecked(data)
        if image is None:
            raise ImageRejected(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected(_identify_other(data)) from None
    except Exception as exc:  # a header that starts right and then breaks
        raise ImageRejected(f"truncated or corrupt image data: {_describe(exc)}") from None
    if image.format not in ACCEPTED_FORMATS:  # pragma: no cover - formats= already limits
        raise ImageRejected(_unsupported(image.format))
    return image


def _open_unchecked(data: bytes) -> Image.Image | None:
    """Header parse by the accepted plugins directly, skipping Pillow's bomb check."""
    Image.init()
    for fmt in _OPEN_FORMATS:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(data[:16]):
                continue
            return factory(io.BytesIO(data), "")
        except Exception:
            continue
    return None


def _identify_other(data: bytes) -> str:
    """Tell "a GIF/WebP we do not take" from "not an image at all" (header parse only)."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format
    except Image.DecompressionBombError:
        fmt = None
    except Exception:
        return "not an image (unrecognised format)"
    if fmt in _LOOSE_FORMATS or not fmt:
        # these plugins have no magic number and "recognise" arbitrary bytes
        return "not an image (unrecognised format)"
    return _unsupported(fmt)


def _unsupported(fmt: str | None) -> str:
    return f"unsupported image format {fmt} (accepted: {', '.join(_PUBLIC_FORMATS)})"


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag; a broken EXIF block leaves pixels as stored."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        transposed = ImageOps.exif_transpose(image)
        if transposed is not None:
            return transposed
    return image


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB.

    * alpha (RGBA, LA, PA, P with transparency, RGBa): composited over **white**. Pixels
      under alpha 0 are undefined (often black or garbage) and would differ between
      otherwise identical images; white is how a viewer shows them.
    * CMYK: Pillow already un-inverts Adobe JPEGs (rawmode CMYK;I); the naive
      (1-C)(1-K) conversion follows (embedded ICC profiles are not applied).
    * 16-bit / 32-bit integer and float grey: scaled by the real bit depth
      (``value * 255 / (2**bits - 1)``), never clipped; see ``_bit_depth``.
    """
    mode = image.mode
    keyed = mode in ("P", "L", "RGB") and "transparency" in image.info  # PNG tRNS
    if mode == "RGB" and not keyed:
        return image
    if keyed or mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb8(image)
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageRejected(f"unsupported pixel mode {mode}") from None


def _bit_depth(image: Image.Image) -> int | None:
    """Bits per sample declared by the file (TIFF BitsPerSample), if any.

    A 12-bit microscope TIFF stored in 16-bit words must map 4095 to white, not to 16.
    """
    tags = getattr(image, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)  # BitsPerSample
        if isinstance(bits, tuple):
            bits = bits[0] if bits else None
        if isinstance(bits, int) and 1 <= bits <= 32:
            return bits
    return None


def _high_depth_to_rgb8(image: Image.Image) -> Image.Image:
    """Scale an I;16*/I/F grey image to 8 bits with rounding, then replicate to RGB."""
    array = np.asarray(image)
    mode = image.mode
    if mode == "F":
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0.0 and hi <= 1.0:
            scaled = values * 255.0  # the usual [0, 1] float convention
        elif hi > lo:
            scaled = (values - lo) * (255.0 / (hi - lo))  # unknown range: stretch
        else:
            scaled = np.zeros_like(values)
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        values = array.astype(np.int64)
        bits = _bit_depth(image)
        if bits is None:
            bits = 16 if mode.startswith("I;16") or values.min(initial=0) >= 0 else 32
            if bits == 16 and values.max(initial=0) > 0xFFFF:
                bits = 32
        if values.min(initial=0) < 0:  # signed data: shift to unsigned first
            values = values - values.min()
        maximum = (1 << bits) - 1
        scaled = values.astype(np.float64) * (255.0 / maximum)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


def preprocess(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize the shorter side, centre-crop, return uint8 HxWx3 (the graph normalises).

    ``image`` is RGB, or 8-bit grey ("L", taken as its RGB conversion: three equal channels).
    """
    width, height = image.size
    new_w, new_h = _resized(width, height, prep)
    return _resize_crop(image, (0, 0, width, height), new_w, new_h, prep)


def _resize_crop(
    image: Image.Image,
    box: tuple[float, float, float, float],
    new_w: int,
    new_h: int,
    prep: Preprocessing,
) -> np.ndarray:
    """The centre crop of ``image``'s ``box`` resized to ``new_w``×``new_h``, computed directly.

    Why: the resize dominates preprocessing on small CNNs. Only the crop's pixels are
    resampled (Pillow's ``box`` at the same scale: the same filter taps over the same
    source pixels, read beyond the box where the filter reaches, so the result is the crop
    of the full resize; float rounding of the tap positions moves at most 1 grey level on
    about 1 in 10,000 pixels of non-square images, none on square ones). An upscale (an
    image smaller than the resize) keeps the full resize: there the rounding moved up to 2
    levels on many pixels, and small images are cheap anyway.
    Grey content (an "L" image, or RGB whose three channels are equal, e.g. greyscale
    scans stored as colour JPEGs) is resampled as one channel (resampling is per channel:
    identical pixels, a third of the work) and replicated at the end.
    """
    x0, y0, x1, y1 = box
    left = (new_w - prep.crop) // 2
    top = (new_h - prep.crop) // 2
    source = _grey_plane(image) or image
    crop = (left, top, left + prep.crop, top + prep.crop)
    resample = _RESAMPLE[prep.interpolation]
    if (new_w, new_h) == (round(x1 - x0), round(y1 - y0)) and (x0, y0) == (0, 0):
        source = source.crop(crop)  # no resize
    elif new_w > x1 - x0 or new_h > y1 - y0:  # an upscale is cheap; resize all, as before
        source = source.resize((new_w, new_h), resample, box=box).crop(crop)
    else:
        sx = (x1 - x0) / new_w
        sy = (y1 - y0) / new_h
        crop_box = (
            x0 + left * sx,
            y0 + top * sy,
            x0 + (left + prep.crop) * sx,
            y0 + (top + prep.crop) * sy,
        )
        source = source.resize((prep.crop, prep.crop), resample, box=crop_box)
    array = np.asarray(source, dtype=np.uint8)
    if array.ndim == 2:
        out = np.empty((*array.shape, 3), np.uint8)
        out[...] = array[:, :, None]
        return out
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {array.shape}")
    return array


def _grey_plane(image: Image.Image) -> Image.Image | None:
    """The single channel of a grey image ("L", or RGB with three equal channels), else None.

    A one-row probe rejects colour images before the full comparison (both in C).
    """
    if image.mode == "L":
        return image
    if image.mode != "RGB":
        return None
    width, height = image.size
    row = image.crop((0, height // 2, width, height // 2 + 1)).tobytes()
    if not row[0::3] == row[1::3] == row[2::3]:
        return None
    red, green, blue = image.split()
    if ImageChops.difference(red, green).getbbox() is not None:
        return None
    if ImageChops.difference(red, blue).getbbox() is not None:
        return None
    return red


def _resized(width: int, height: int, prep: Preprocessing) -> tuple[int, int]:
    scale = prep.resize_shorter / min(width, height)
    return max(prep.crop, round(width * scale)), max(prep.crop, round(height * scale))


def _crop(image: Image.Image, new_w: int, new_h: int, prep: Preprocessing) -> np.ndarray:
    left = (new_w - prep.crop) // 2
    top = (new_h - prep.crop) // 2
    image = image.crop((left, top, left + prep.crop, top + prep.crop))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {array.shape}")
    return array
