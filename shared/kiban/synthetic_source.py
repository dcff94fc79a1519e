"""Synthetic image sources: labelled textures generated from the key on every read.

``synthetic://textures?n=1000000&classes=8&size=224`` is a read-only object store that holds
``n`` images without a single file: listing yields their keys (cheaply, in order, in
constant memory) and ``get`` renders the image of a key on demand. It exists so that a
whole deployment — ingest, encode, index, evaluate — can be load-tested at a million
images, and so that the demo and the tests share one texture generator.

URI grammar (parameters in any order, each at most once; anything else is refused with
an error that names the parameter)::

    synthetic://textures?n=N[&classes=C][&size=S][&format=jpeg|png][&seed=K]

    n        images in the source, 1 <= n <= 100,000,000 and n >= classes (required)
    classes  number of classes, 2..1000 (default 8)
    size     side of the square images in pixels, 16..1024 (default 224)
    format   jpeg (default; quality 90, 4:4:4 — decode cost like a real night) or png
    seed     0..2**32-1 (default 0): another seed, other images

Keys are ``c<class:03d>/<index:08d>.jpg|png``: the class is the first folder, so folder
labelling gives the label (``c003``), and both numbers are zero-padded so that string
order (Python's, and S3's byte order) is numeric order. Images are dealt to classes in
turn by count: class ``c`` holds ``n // classes`` images, one more when
``c < n % classes``. A key names the same image whatever ``n`` is, so a smaller source is
a subset of a larger one with the same classes, size, format and seed. There are no
groups: kiban reads groups only from a manifest, and a million-row manifest is what this
source is meant to avoid — a synthetic batch is evaluated leave-one-out.

What an image is: class ``c`` is texture family ``c % 8`` (``FAMILIES``); classes beyond
the eighth repeat the families with a colour tint of their own, so they stay
distinguishable but overlap more. To keep rendering cheap next to the stages it
feeds (a few ms per 224 px JPEG), each process renders a small *bank* of ``BANK`` full
textures per class once (kept in a bounded LRU cache, ``BANK_CACHE_BYTES``) and every
image is a cheap, key-seeded variation of one of them: a dihedral transform, a cyclic
shift, a per-channel gain and offset, and a window of a seeded noise tile. Every random
draw comes from ``numpy.random.default_rng`` seeded by (seed, class, index) — i.e. by
the key — so every process produces the same pixels, and the encoder settings are fixed,
so the same bytes (same sha256) on every read, in every process, with the same
numpy/Pillow builds.

Exact sizes without rendering: every object of a source has the same size,
``object_size(spec)``, an upper bound of the encoded image computed from the parameters
and filled exactly by padding — JPEG: comment (COM) segments after the JFIF header; PNG: a
private ancillary chunk (``kbPd``) after IHDR. The padding starts with the key, so no two
objects share bytes (ingest would de-duplicate them). A JPEG that would not fit is
re-encoded at a lower quality (not seen in the images measured: at most 1.2 B/px
against a bound of 1.5; the path is tested with a tightened bound). So
``ObjectInfo.size == len(get(key))`` holds without rendering at listing time.

Pillow is imported only when an image is rendered: listing needs none.
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlparse

import numpy as np

from kiban.errors import ObjectTooLargeError, StoreError
from kiban.store import ObjectInfo, safe_key

if TYPE_CHECKING:
    from PIL import Image

Pattern = Callable[[np.random.Generator, int], np.ndarray]

JPEG_QUALITY = 90


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    return coords[None, :], coords[:, None]  # x (row vector), y (column vector)


def _smooth_field(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Gaussian noise with a 1/f**beta amplitude spectrum, zero mean, unit std."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = rng.standard_normal((size, size // 2 + 1)) + 1j * rng.standard_normal(
        (size, size // 2 + 1)
    )
    spectrum /= radius**beta
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(size, size))
    return _standardise(field)


def _standardise(field: np.ndarray) -> np.ndarray:
    std = field.std()
    return (field - field.mean()) / (std if std > 1e-12 else 1.0)


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by multiplication in the Fourier domain (periodic edges)."""
    if sigma <= 0.05:
        return field
    size_y, size_x = field.shape
    fy = np.fft.fftfreq(size_y)[:, None]
    fx = np.fft.rfftfreq(size_x)[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(field) * transfer, s=field.shape)


def _stripes(period_low: float, period_high: float) -> Pattern:
    def make(rng: np.random.Generator, size: int) -> np.ndarray:
        x, y = _grid(size)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(period_low, period_high)
        wobble = _smooth_field(rng, size, 3.0) * rng.uniform(0.0, 1.5)
        phase = rng.uniform(0, 2 * np.pi)
        u = (x * np.cos(theta) + y * np.sin(theta)) * 2 * np.pi / period
        wave = np.sin(u + phase + wobble)
        sharpness = rng.uniform(0.8, 4.0)  # sine ... almost square
        return np.tanh(sharpness * wave)

    return make


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    theta = rng.uniform(0, np.pi / 2)
    period = rng.uniform(8.0, 22.0)
    aspect = rng.uniform(0.8, 1.25)
    u = (x * np.cos(theta) + y * np.sin(theta)) * 2 * np.pi / period + rng.uniform(0, 6.3)
    v = (-x * np.sin(theta) + y * np.cos(theta)) * 2 * np.pi / (period * aspect)
    v = v + rng.uniform(0, 6.3)
    if rng.random() < 0.5:  # checkerboard
        return np.tanh(3.0 * np.sin(u)) * np.tanh(3.0 * np.sin(v))
    width = rng.uniform(4.0, 16.0)  # grid of thin lines
    return np.maximum(np.abs(np.cos(u)) ** width, np.abs(np.cos(v)) ** width)


def _spots(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    field = np.zeros((size, size))
    count = int(rng.integers(6, 40))
    sign = 1.0 if rng.random() < 0.5 else -1.0  # dark pits or bright inclusions
    for _ in range(count):
        cx, cy = rng.uniform(-size / 2, size / 2, 2)
        radius = rng.uniform(1.5, 7.0) * size / 128
        amplitude = rng.uniform(0.4, 1.0) * sign
        field += amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
    return field + 0.15 * _smooth_field(rng, size, 1.5)


def _scratches(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    field = 0.25 * _smooth_field(rng, size, 1.0)
    main = rng.uniform(0, np.pi)
    spread = rng.uniform(0.05, 0.6)
    for _ in range(int(rng.integers(3, 14))):
        angle = main + rng.normal(0, spread)
        length = rng.uniform(0.3, 1.2) * size
        cx, cy = rng.uniform(-size / 2, size / 2, 2)
        dx, dy = np.cos(angle), np.sin(angle)
        # distance from each pixel to the segment through (cx, cy) of that length
        t = np.clip((x - cx) * dx + (y - cy) * dy, -length / 2, length / 2)
        dist = np.hypot(x - (cx + t * dx), y - (cy + t * dy))
        width = rng.uniform(0.5, 1.8)
        field += rng.uniform(0.6, 1.2) * np.exp(-(dist**2) / (2 * width**2))
    return field


def _rings(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    reach = rng.uniform(0.0, 1.5) * size  # a far centre makes gently curved stripes
    angle = rng.uniform(0, 2 * np.pi)
    radius = np.hypot(x - reach * np.cos(angle), y - reach * np.sin(angle))
    period = rng.uniform(5.0, 16.0)
    wave = np.sin(radius * 2 * np.pi / period + rng.uniform(0, 6.3))
    return np.tanh(rng.uniform(0.8, 3.0) * wave)


def _noise(beta_low: float, beta_high: float) -> Pattern:
    def make(rng: np.random.Generator, size: int) -> np.ndarray:
        return _smooth_field(rng, size, rng.uniform(beta_low, beta_high))

    return make


#: Texture families in the order classes are taken (``n_classes`` takes the first n).
FAMILIES: dict[str, Pattern] = {
    "stripes_fine": _stripes(3.5, 6.5),
    "stripes_coarse": _stripes(6.0, 14.0),
    "checker": _checker,
    "spots": _spots,
    "scratches": _scratches,
    "rings": _rings,
    "cloudy": _noise(1.6, 2.4),
    "grainy": _noise(0.0, 0.6),
}


@dataclass(frozen=True)
class Lot:
    """Nuisance shared by every image of one lot (a batch of material, a slide)."""

    brightness: float
    contrast: float
    cast: np.ndarray  # per-channel gain
    noise: float
    blur: float
    gradient: np.ndarray  # illumination slope (x, y) per pixel


def make_lot(seed: int, class_index: int, lot_index: int) -> Lot:
    """The nuisance of lot ``lot_index`` of class ``class_index``, fixed by the seed."""
    rng = np.random.default_rng([seed, 1, class_index, lot_index])
    return Lot(
        brightness=float(rng.normal(0.5, 0.07)),
        contrast=float(rng.uniform(0.7, 1.25)),
        cast=1.0 + rng.normal(0.0, 0.07, 3),
        noise=float(rng.uniform(0.005, 0.05)),
        blur=float(rng.uniform(0.0, 1.0)),
        gradient=rng.normal(0.0, 0.0008, 2),
    )


def render_pixels(
    family: str, seed: int, class_index: int, index: int, lot: Lot, size: int
) -> np.ndarray:
    """One ``size x size`` RGB uint8 texture, fully determined by its arguments."""
    rng = np.random.default_rng([seed, 2, class_index, index])
    field = _standardise(FAMILIES[family](rng, size))
    field = _blur(field, lot.blur + rng.uniform(0.0, 1.2))
    field = _standardise(field)
    x, y = _grid(size)
    grey = (
        lot.brightness
        + rng.normal(0.0, 0.03)
        + field * rng.uniform(0.10, 0.22) * lot.contrast
        + x * lot.gradient[0]
        + y * lot.gradient[1]
    )
    colour = grey[..., None] * lot.cast[None, None, :]
    colour = colour + rng.normal(0.0, lot.noise + rng.uniform(0, 0.02), colour.shape)
    return np.clip(np.rint(colour * 255.0), 0, 255).astype(np.uint8)


def render(
    family: str, seed: int, class_index: int, index: int, lot: Lot, size: int
) -> Image.Image:
    """``render_pixels`` as a Pillow RGB image."""
    from PIL import Image

    return Image.fromarray(render_pixels(family, seed, class_index, index, lot, size), "RGB")


def encode(image: Image.Image, suffix: str, quality: int = JPEG_QUALITY) -> bytes:
    """Fixed encoder settings so that the same pixels always give the same bytes."""
    buf = io.BytesIO()
    if suffix == ".png":
        image.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        image.save(buf, "JPEG", quality=quality, optimize=False, subsampling=0)
    return buf.getvalue()


# --- the synthetic source -----------------------------------------------------------------

SCHEME = "synthetic"
#: Generators a synthetic URI may name (its host part).
GENERATORS = ("textures",)
MAX_IMAGES = 100_000_000
MIN_CLASSES, MAX_CLASSES = 2, 1000
MIN_SIZE, MAX_SIZE = 16, 1024
MAX_SEED = 2**32 - 1
#: Encoded format → key suffix.
FORMATS = {"jpeg": ".jpg", "png": ".png"}
#: Full textures rendered per class and process; every image varies one of them.
BANK = 8
#: Bound on the banks a process keeps (least recently used class dropped first; the one in
#: use is always kept).
BANK_CACHE_BYTES = 96 * 1024 * 1024
#: JPEG size bound: fixed part (headers, tables, the key) plus bytes per pixel. The largest
#: JPEG measured was under 1.2 B/px (quality 90, 4:4:4, grainy textures with noise).
JPEG_FIXED_BYTES = 4096
JPEG_BYTES_PER_PIXEL = 1.5
#: Qualities tried, in order, when a JPEG would not fit its bound (not seen in measurements).
_FALLBACK_QUALITIES = (80, 70, 60, 50, 40, 30, 20, 10)
#: Private, ancillary, safe-to-copy PNG chunk type that carries the padding.
PNG_PAD_CHUNK = b"kbPd"
_INT = re.compile(r"[0-9]{1,12}")
_KEY = re.compile(r"c([0-9]{3})/([0-9]{8})(\.jpg|\.png)")
_CLASS = re.compile(r"c([0-9]{3})")


@dataclass(frozen=True)
class SyntheticSpec:
    """The parameters of one synthetic source; every key and byte follows from them."""

    generator: str
    n: int
    classes: int
    size: int
    format: str = "jpeg"
    seed: int = 0

    @property
    def uri(self) -> str:
        """The canonical URI (every parameter spelled out): what ingest records as the
        source, so that encoder and trainer re-open exactly this source."""
        return (
            f"{SCHEME}://{self.generator}?n={self.n}&classes={self.classes}"
            f"&size={self.size}&format={self.format}&seed={self.seed}"
        )

    @property
    def suffix(self) -> str:
        return FORMATS[self.format]

    def class_count(self, class_index: int) -> int:
        """Images of class ``class_index`` (classes are dealt ``n`` in turn)."""
        return self.n // self.classes + (1 if class_index < self.n % self.classes else 0)

    def key(self, class_index: int, index: int) -> str:
        return f"c{class_index:03d}/{index:08d}{self.suffix}"


def _bad(uri: str, message: str) -> StoreError:
    return StoreError(f"synthetic source {uri!r}: {message}")


def _integer(uri: str, name: str, text: str, low: int, high: int) -> int:
    if not _INT.fullmatch(text) or not low <= int(text) <= high:
        raise _bad(uri, f"parameter {name!r} must be a whole number from {low:,} to {high:,}")
    return int(text)


def parse_synthetic_uri(uri: str) -> SyntheticSpec:
    """The spec of ``synthetic://textures?n=...``; a StoreError that names the bad part."""
    parsed = urlparse(uri)
    if parsed.scheme != SCHEME:
        raise _bad(uri, f"not a {SCHEME}:// URI")
    if parsed.netloc not in GENERATORS:
        raise _bad(uri, f"unknown generator {parsed.netloc!r} (known: {', '.join(GENERATORS)})")
    if parsed.path not in ("", "/") or parsed.params or parsed.fragment:
        raise _bad(uri, "expected synthetic://textures?n=N&classes=C&size=S (no path)")
    try:
        pairs = parse_qsl(parsed.query, keep_blank_values=True, strict_parsing=bool(parsed.query))
    except ValueError:
        raise _bad(uri, "the query must be name=value pairs joined by '&'") from None
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in ("n", "classes", "size", "format", "seed"):
            raise _bad(uri, f"unknown parameter {name!r} (known: n, classes, size, format, seed)")
        if name in values:
            raise _bad(uri, f"parameter {name!r} given twice")
        values[name] = value
    if "n" not in values:
        raise _bad(uri, "parameter 'n' (the number of images) is required")
    n = _integer(uri, "n", values["n"], 1, MAX_IMAGES)
    classes = _integer(uri, "classes", values.get("classes", "8"), MIN_CLASSES, MAX_CLASSES)
    size = _integer(uri, "size", values.get("size", "224"), MIN_SIZE, MAX_SIZE)
    seed = _integer(uri, "seed", values.get("seed", "0"), 0, MAX_SEED)
    fmt = values.get("format", "jpeg")
    if fmt not in FORMATS:
        raise _bad(uri, f"parameter 'format' must be one of {', '.join(FORMATS)}")
    if n < classes:
        raise _bad(uri, f"parameter 'n' ({n}) must be at least 'classes' ({classes})")
    return SyntheticSpec(parsed.netloc, n, classes, size, fmt, seed)


def _tag(key: str) -> bytes:
    return f"kiban synthetic {key} ".encode()


def object_size(spec: SyntheticSpec) -> int:
    """The size of every object of ``spec``: a bound of its encoded image plus the padding
    header, computed from the parameters alone (listing renders nothing)."""
    pixels = spec.size * spec.size
    if spec.format == "jpeg":
        return JPEG_FIXED_BYTES + int(np.ceil(pixels * JPEG_BYTES_PER_PIXEL))
    raw = spec.size * (3 * spec.size + 1)  # filter byte + RGB per row
    deflated = raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 19  # zlib's deflateBound
    idat_headers = 12 * (deflated // 1024 + 2)  # however Pillow splits IDAT chunks
    return 1024 + deflated + idat_headers  # signature, IHDR, IEND, padding chunk, key


def _jpeg_padded(data: bytes, target: int, tag: bytes) -> bytes | None:
    """``data`` with COM segments after the JFIF header filling it to ``target`` bytes."""
    if data[:4] != b"\xff\xd8\xff\xe0":
        raise StoreError("synthetic JPEG without a JFIF header: cannot pad it")
    at = 4 + int.from_bytes(data[4:6], "big")
    missing = target - len(data)
    if missing < 4 + len(tag):
        return None
    segments: list[bytes] = []
    while missing > 0:
        total = min(missing, 4 + 65533)
        if 0 < missing - total < 4:
            total -= 4  # leave room for a whole segment after this one
        body = (b"" if segments else tag).ljust(total - 4, b" ")
        segments.append(b"\xff\xfe" + (total - 2).to_bytes(2, "big") + body)
        missing -= total
    return data[:at] + b"".join(segments) + data[at:]


def _png_padded(data: bytes, target: int, tag: bytes) -> bytes | None:
    """``data`` with one ``kbPd`` chunk after IHDR filling it to ``target`` bytes."""
    import zlib

    if data[12:16] != b"IHDR":
        raise StoreError("synthetic PNG without IHDR first: cannot pad it")
    body_len = target - len(data) - 12
    if body_len < len(tag):
        return None
    body = tag.ljust(body_len, b"\x00")
    crc = zlib.crc32(PNG_PAD_CHUNK + body).to_bytes(4, "big")
    chunk = body_len.to_bytes(4, "big") + PNG_PAD_CHUNK + body + crc
    return data[:33] + chunk + data[33:]


_bank_lock = threading.Lock()
_banks: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()


def _class_tint(seed: int, class_index: int) -> np.ndarray:
    """Per-channel gain that sets classes apart once the families repeat (class >= 8)."""
    if class_index < len(FAMILIES):
        return np.ones(3)
    return np.random.default_rng([seed, 3, class_index]).uniform(0.55, 1.45, 3)


def _tinted(lot: Lot, tint: np.ndarray) -> Lot:
    return replace(lot, cast=lot.cast * tint)


def _bank(seed: int, size: int, class_index: int) -> np.ndarray:
    """``BANK`` full textures of one class, ``(BANK, size, size, 3)`` uint8, cached."""
    key = (seed, size, class_index)
    with _bank_lock:
        if key in _banks:
            _banks.move_to_end(key)
            return _banks[key]
    family = list(FAMILIES)[class_index % len(FAMILIES)]
    tint = _class_tint(seed, class_index)
    bank = np.stack(
        [
            render_pixels(
                family,
                seed,
                class_index,
                b,
                _tinted(make_lot(seed, class_index, b), tint),
                size,
            )
            for b in range(BANK)
        ]
    )
    with _bank_lock:
        _banks[key] = bank
        _banks.move_to_end(key)
        while len(_banks) > 1 and sum(b.nbytes for b in _banks.values()) > BANK_CACHE_BYTES:
            _banks.popitem(last=False)
    return bank


_noise_lock = threading.Lock()
_noise_tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()


def _noise_tile(seed: int, size: int) -> np.ndarray:
    """Seeded sensor-like noise, ``(2 size, 2 size, 3)`` int8; images take a window of it."""
    key = (seed, size)
    with _noise_lock:
        if key in _noise_tiles:
            _noise_tiles.move_to_end(key)
            return _noise_tiles[key]
    tile = np.random.default_rng([seed, 8, size]).integers(
        -6, 7, (2 * size, 2 * size, 3), dtype=np.int8
    )
    with _noise_lock:
        _noise_tiles[key] = tile
        while len(_noise_tiles) > 2:
            _noise_tiles.popitem(last=False)
    return tile


def image_pixels(spec: SyntheticSpec, class_index: int, index: int) -> np.ndarray:
    """The ``size x size`` RGB uint8 pixels of image ``index`` of class ``class_index``.

    One bank texture, turned/flipped (8 ways), shifted cyclically, scaled per channel
    (integer gain /64: 0.84..1.14), offset, plus a window of the noise tile — integer
    arithmetic after the bank (about 1 ms at 224 px, AMD EPYC, shared).
    """
    size = spec.size
    bank = _bank(spec.seed, size, class_index)
    rng = np.random.default_rng([spec.seed, 7, class_index, index])
    choice, turn = int(rng.integers(BANK)), int(rng.integers(8))
    dy, dx, ny, nx = (int(v) for v in rng.integers(0, size, 4))
    gain = rng.integers(54, 74, 3).astype(np.int16)
    offset = int(rng.integers(-12, 13))
    pixels = np.rot90(bank[choice], turn % 4)
    if turn >= 4:
        pixels = pixels[:, ::-1]
    out = np.empty((size, size, 3), np.int16)  # the cyclic shift, written in four blocks
    out[dy:, dx:] = pixels[: size - dy, : size - dx]
    out[:dy, dx:] = pixels[size - dy :, : size - dx]
    out[dy:, :dx] = pixels[: size - dy, size - dx :]
    out[:dy, :dx] = pixels[size - dy :, size - dx :]
    out *= gain  # at most 255 * 73: no int16 overflow
    out >>= 6
    out += _noise_tile(spec.seed, size)[ny : ny + size, nx : nx + size]
    out += offset
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def render_object(spec: SyntheticSpec, class_index: int, index: int) -> bytes:
    """The bytes of one object: the encoded image padded to exactly ``object_size(spec)``."""
    from PIL import Image

    image = Image.fromarray(image_pixels(spec, class_index, index), "RGB")
    target, tag = object_size(spec), _tag(spec.key(class_index, index))
    if spec.format == "png":
        padded = _png_padded(encode(image, ".png"), target, tag)
    else:
        padded = None
        for quality in (JPEG_QUALITY, *_FALLBACK_QUALITIES):
            padded = _jpeg_padded(encode(image, ".jpg", quality), target, tag)
            if padded is not None:
                break
    if padded is None or len(padded) != target:
        raise StoreError(
            f"synthetic image {spec.key(class_index, index)!r} does not fit its size bound "
            f"of {target} bytes (a bug: please report the URI {spec.uri})"
        )
    return padded


class SyntheticStore:
    """A read-only ``ObjectStore`` whose objects are rendered from their key on read."""

    def __init__(self, spec: SyntheticSpec, max_object_bytes: int | None = None) -> None:
        self.spec = spec
        self.uri = spec.uri
        self.max_object_bytes = max_object_bytes
        self.object_size = object_size(spec)

    def _locate(self, key: str) -> tuple[int, int] | None:
        """(class, index) of ``key``, or None when the source holds no such object."""
        match = _KEY.fullmatch(key)
        if match is None or match[3] != self.spec.suffix:
            return None
        class_index, index = int(match[1]), int(match[2])
        if class_index >= self.spec.classes or index >= self.spec.class_count(class_index):
            return None
        return class_index, index

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        found = self._locate(safe_key(key))
        if found is None:
            raise StoreError(f"no object {key!r} in {self.uri}")
        limit = self.max_object_bytes if max_bytes is None else max_bytes
        if limit is not None and self.object_size > limit:
            reason = f"too large: more than {limit} bytes (KIBAN_MAX_OBJECT_BYTES)"
            raise ObjectTooLargeError(f"{key!r} in {self.uri}: {reason}", reason)
        return render_object(self.spec, *found)

    def put(self, key: str, data: bytes) -> None:
        raise StoreError(f"cannot write {key!r} in {self.uri}: a synthetic source is read-only")

    def exists(self, key: str) -> bool:
        try:
            return self._locate(safe_key(key)) is not None
        except StoreError:
            return False

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object in ascending key order, generated (constant memory, no rendering).

        ``prefix`` names a folder (``c003``) or one key, like the other stores."""
        spec, size = self.spec, self.object_size
        classes: range | list[int] = range(spec.classes)
        if prefix.strip("/"):
            rel = safe_key(prefix.strip("/"))
            folder = _CLASS.fullmatch(rel)
            if folder is None:
                found = self._locate(rel)
                if found is not None:
                    yield ObjectInfo(rel, size)
                return
            class_index = int(folder[1])
            classes = [class_index] if class_index < spec.classes else []
        suffix = spec.suffix
        for class_index in classes:
            folder_name = f"c{class_index:03d}/"
            for index in range(spec.class_count(class_index)):
                yield ObjectInfo(f"{folder_name}{index:08d}{suffix}", size)

    def delete(self, key: str) -> None:
        raise StoreError(f"cannot delete {key!r} in {self.uri}: a synthetic source is read-only")


def open_synthetic(uri: str, max_object_bytes: int | None = None) -> SyntheticStore:
    """The store behind ``synthetic://...`` (see the module docstring for the grammar)."""
    return SyntheticStore(parse_synthetic_uri(uri), max_object_bytes)


def measure(uri: str, n_render: int = 2000) -> dict[str, float]:
    """Time the listing of ``uri`` and the rendering of ``n_render`` of its images (spread
    over the classes, in listing order): what an operator runs on worker hardware to size a
    load test. Returns the figures it prints."""
    import resource
    import time

    store = open_synthetic(uri)
    start, count, total = time.perf_counter(), 0, 0
    for info in store.list():
        count, total = count + 1, total + info.size
    listed = time.perf_counter() - start
    spec = store.spec
    per_class = max(1, n_render // spec.classes)
    keys = [
        spec.key(c, i)
        for c in range(spec.classes)
        for i in range(min(per_class, spec.class_count(c)))
    ][:n_render]
    start = time.perf_counter()
    for key in keys:
        store.get(key)
    rendered = time.perf_counter() - start
    return {
        "keys": count,
        "list_seconds": listed,
        "keys_per_second": count / listed if listed else 0.0,
        "bytes_listed": total,
        "object_bytes": store.object_size,
        "rendered": len(keys),
        "images_per_second": len(keys) / rendered if rendered else 0.0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m kiban.synthetic_source URI [--render N]``: listing and rendering rates."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("uri", help="synthetic://textures?n=...&classes=...&size=...")
    parser.add_argument("--render", type=int, default=2000, help="images to render (timed)")
    args = parser.parse_args(argv)
    try:
        figures = measure(args.uri, args.render)
    except StoreError as exc:
        parser.exit(2, f"{exc}\n")
    print(json.dumps({"uri": open_synthetic(args.uri).uri, **figures}, indent=2))


__all__ = [
    "FAMILIES",
    "JPEG_QUALITY",
    "Lot",
    "SyntheticSpec",
    "SyntheticStore",
    "encode",
    "make_lot",
    "measure",
    "object_size",
    "open_synthetic",
    "parse_synthetic_uri",
    "render",
    "render_object",
    "render_pixels",
]


if __name__ == "__main__":
    main()
