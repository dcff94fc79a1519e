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
run with the same Pillow/libjpeg/zlib build. The texture generator itself (families,
lots, ``render``, ``encode``) lives in ``kiban.synthetic_source``, shared with the
``synthetic://`` load-test source; this module writes it out as a demo data set.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kiban.synthetic_source import FAMILIES, JPEG_QUALITY, Lot, encode, make_lot, render

__all__ = [
    "FAMILIES",
    "JPEG_QUALITY",
    "PNG_EVERY",
    "Lot",
    "ProblemFile",
    "encode",
    "generate_texture_dataset",
    "problem_files",
    "render",
    "sample_images",
]

#: Images whose index within the class is ``≡ PNG_EVERY - 1 (mod PNG_EVERY)`` are PNG.
PNG_EVERY = 16


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
        lots = [make_lot(seed, class_index, g) for g in range(groups_per_class)]
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
        lot = make_lot(seed, class_index, 1000 + i)
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
    good = render("checker", seed, 2, 99_000, make_lot(seed, 2, 999), size)
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
