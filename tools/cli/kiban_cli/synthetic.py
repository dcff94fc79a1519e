"""Deterministic synthetic labelled textures: a data set that needs no download.

Why textures: steel-surface and histology images are textures, and a generic ImageNet
CNN separates texture families well but not perfectly, which is the regime kiban's
retrieval evaluation is about. The families are chosen so that some pairs overlap on
purpose (fine vs. coarse stripes differ only in frequency band; rings with a far-away
centre look like curved stripes; low-pass noise looks like blurred spots), and every
image varies in frequency, orientation, phase, contrast, blur and noise.

Each image belongs to a *lot* (``group``): images of a lot share nuisance (brightness,
colour cast, noise level, blur, an illumination gradient) the way tiles of one slide
share staining. Lots are per class, so a retrieval that matches lot nuisance instead
of texture looks better than it is, unless the evaluation excludes the query's lot.

Everything is drawn from ``numpy.random.default_rng`` seeded per image, and files are
written with fixed encoder settings, so the same seed gives the same bytes on every
run with the same Pillow/libjpeg/zlib build.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

Pattern = Callable[[np.random.Generator, int], np.ndarray]

JPEG_QUALITY = 90
#: Images whose index within the class is ``≡ PNG_EVERY - 1 (mod PNG_EVERY)`` are PNG.
PNG_EVERY = 16


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


def _lot(seed: int, class_index: int, lot_index: int) -> Lot:
    rng = np.random.default_rng([seed, 1, class_index, lot_index])
    return Lot(
        brightness=float(rng.normal(0.5, 0.07)),
        contrast=float(rng.uniform(0.7, 1.25)),
        cast=1.0 + rng.normal(0.0, 0.07, 3),
        noise=float(rng.uniform(0.005, 0.05)),
        blur=float(rng.uniform(0.0, 1.0)),
        gradient=rng.normal(0.0, 0.0008, 2),
    )


def render(
    family: str, seed: int, class_index: int, index: int, lot: Lot, size: int
) -> Image.Image:
    """One RGB texture image, fully determined by its arguments."""
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
    pixels = np.clip(np.rint(colour * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, suffix: str) -> bytes:
    """Fixed encoder settings so that the same pixels always give the same bytes."""
    buf = io.BytesIO()
    if suffix == ".png":
        image.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        image.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=False, subsampling=0)
    return buf.getvalue()


def generate_texture_dataset(
    out_dir: Path,
    n_classes: int = 6,
    per_class: int = 80,
    size: int = 128,
    seed: int = 0,
    groups_per_class: int = 8,
) -> Path:
    """Write ``<class>/<class>-NNNN.jpg|png`` and ``manifest.csv``; return the manifest path.

    The manifest has ``key,label,group`` with keys relative to ``out_dir`` and group
    ``<class>-lotNN``. Image ``i`` of a class belongs to lot ``i % groups_per_class``.
    """
    if not 1 <= n_classes <= len(FAMILIES):
        raise ValueError(f"n_classes must be between 1 and {len(FAMILIES)}, got {n_classes}")
    if per_class < 1 or groups_per_class < 1 or size < 16:
        raise ValueError("per_class and groups_per_class must be >= 1 and size >= 16")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    for class_index, family in enumerate(list(FAMILIES)[:n_classes]):
        (out_dir / family).mkdir(exist_ok=True)
        lots = [_lot(seed, class_index, g) for g in range(groups_per_class)]
        for index in range(per_class):
            lot_index = index % groups_per_class
            image = render(family, seed, class_index, index, lots[lot_index], size)
            suffix = ".png" if index % PNG_EVERY == PNG_EVERY - 1 else ".jpg"
            key = f"{family}/{family}-{index:04d}{suffix}"
            (out_dir / key).write_bytes(encode(image, suffix))
            rows.append((key, family, f"{family}-lot{lot_index:02d}"))
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["key", "label", "group"])
        writer.writerows(rows)
    return manifest


_SAMPLE_SIZES = ((128, 128), (200, 150), (97, 311), (256, 256), (64, 96), (333, 222))


def sample_images(n: int = 8, seed: int = 0) -> list[Image.Image]:
    """``n`` RGB textures of various sizes and classes, in memory (export parity checks)."""
    families = list(FAMILIES)
    images = []
    for i in range(n):
        class_index = i % len(families)
        width, height = _SAMPLE_SIZES[i % len(_SAMPLE_SIZES)]
        side = max(width, height)
        lot = _lot(seed, class_index, 1000 + i)
        square = render(families[class_index], seed, class_index, 10_000 + i, lot, side)
        images.append(square.crop((0, 0, width, height)))
    return images


@dataclass(frozen=True)
class ProblemFile:
    """A planted file and what ingest must make of it.

    ``expect`` is the quarantine reason's prefix, or ``None`` when the file must be
    accepted (converted to RGB).
    """

    name: str
    data: bytes
    expect: str | None


def problem_files(seed: int = 0, size: int = 64) -> list[ProblemFile]:
    """Bad and awkward-but-valid files, to plant in a source and check ingest.

    The bomb is a genuine 4000×4000 PNG of a few kB: it is rejected only under a
    ``max_pixels`` below 16 000 000 (tests pass a low limit).
    """
    good = render("checker", seed, 2, 99_000, _lot(seed, 2, 999), size)
    jpeg = encode(good, ".jpg")

    def save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt, **kwargs)
        return buf.getvalue()

    ramp = np.linspace(0, 65535, size * size).reshape(size, size).astype(np.uint16)
    rotated = good.resize((size * 2, size))
    exif = rotated.getexif()
    exif[0x0112] = 6
    return [
        ProblemFile("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated or corrupt image data"),
        ProblemFile("empty.jpg", b"", "empty file (0 bytes)"),
        ProblemFile("notes.jpg", b"this is a text file, not a JPEG\n" * 8, "not an image"),
        ProblemFile("bomb.png", save(Image.new("L", (4000, 4000)), "PNG"), "decompression bomb"),
        ProblemFile("tiny.png", save(Image.new("RGB", (1, 1)), "PNG"), "image too small"),
        ProblemFile("grey16.tif", save(Image.fromarray(ramp), "TIFF"), None),
        ProblemFile("cmyk.jpg", save(good.convert("CMYK"), "JPEG", quality=90), None),
        ProblemFile("rotated.jpg", save(rotated, "JPEG", quality=90, exif=exif.tobytes()), None),
        ProblemFile("rgba.png", save(good.convert("RGBA"), "PNG"), None),
        ProblemFile("good.jpg", jpeg, None),
        ProblemFile("good-copy.jpg", jpeg, None),  # exact duplicate of good.jpg
    ]
