"""Prometheus counters of the ingest container.

The quarantine reason label is a short category, never the free-text reason: label
values must stay few (Prometheus keeps one series per value).
"""

from __future__ import annotations

from prometheus_client import Counter

IMAGES_INGESTED = Counter(
    "kiban_images_ingested_total", "Images accepted by ingest (duplicates not counted)"
)
IMAGES_QUARANTINED = Counter(
    "kiban_images_quarantined_total", "Files quarantined by ingest", ["reason"]
)

CATEGORIES = (
    ("empty file", "empty"),
    ("not an image", "not_image"),
    ("truncated or corrupt", "corrupt"),
    ("decompression bomb", "bomb"),
    ("image too small", "too_small"),
    ("unsupported image format", "unsupported_format"),
    ("unsupported pixel mode", "unsupported_format"),
    ("unsupported file type", "unsupported_file_type"),
    ("listed in manifest", "missing"),
    ("manifest line", "manifest_row"),
    ("cannot read", "unreadable"),
    ("cannot list folder", "unreadable"),
    ("cannot stat", "unreadable"),
    ("too large", "too_large"),
    ("not a regular file", "not_regular_file"),
    ("symbolic link", "link"),
    ("dangling symbolic link", "link"),
    ("name ", "bad_name"),
    ("folder name ", "bad_name"),
    ("a folder on the way", "link"),
)


def reason_category(reason: str) -> str:
    """Map a quarantine reason to its metric label value."""
    for prefix, category in CATEGORIES:
        if reason.startswith(prefix):
            return category
    return "other"
