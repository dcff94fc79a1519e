"""The synthetic texture set is deterministic, complete and decodable."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kiban.imaging import ImageRejected, decode_image
from kiban_cli.synthetic import (
    FAMILIES,
    generate_texture_dataset,
    problem_files,
    sample_images,
)


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    generate_texture_dataset(tmp_path / "a", n_classes=3, per_class=20, size=64, seed=7)
    generate_texture_dataset(tmp_path / "b", n_classes=3, per_class=20, size=64, seed=7)
    generate_texture_dataset(tmp_path / "c", n_classes=3, per_class=20, size=64, seed=8)
    a, b, c = digests(tmp_path / "a"), digests(tmp_path / "b"), digests(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) > 55  # another seed: other images


def test_default_demo_counts_and_manifest(tmp_path: Path) -> None:
    manifest = generate_texture_dataset(tmp_path)
    assert manifest == tmp_path / "manifest.csv"
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["key", "label", "group"]
    assert len(rows) == 480
    labels = Counter(r["label"] for r in rows)
    assert sorted(labels) == sorted(list(FAMILIES)[:6])
    assert set(labels.values()) == {80}
    groups = Counter(r["group"] for r in rows)
    assert len(groups) == 6 * 8 and set(groups.values()) == {10}
    for row in rows:
        assert row["key"].split("/")[0] == row["label"]
        assert row["group"].startswith(row["label"] + "-lot")
        assert (tmp_path / row["key"]).is_file()
    suffixes = Counter(Path(r["key"]).suffix for r in rows)
    assert suffixes[".png"] == 6 * 5 and suffixes[".jpg"] == 480 - 30
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "manifest.csv"]
    assert len(files) == 480


def test_images_decode_and_classes_differ(tmp_path: Path) -> None:
    generate_texture_dataset(tmp_path, n_classes=6, per_class=4, size=96)
    for path in sorted(tmp_path.rglob("*.*g")):
        image = decode_image(path.read_bytes())
        assert image.size == (96, 96) and image.mode == "RGB"
        assert np.asarray(image).std() > 5  # a texture, not a flat colour


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        generate_texture_dataset(Path("/nonexistent"), n_classes=len(FAMILIES) + 1)


def test_sample_images_various_sizes_deterministic() -> None:
    first, second = sample_images(8, seed=3), sample_images(8, seed=3)
    assert len(first) == 8
    assert len({im.size for im in first}) >= 5
    for a, b in zip(first, second, strict=True):
        assert a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_problem_files_behave_as_declared() -> None:
    for planted in problem_files():
        if planted.expect is None:
            assert decode_image(planted.data, max_pixels=1_000_000).mode == "RGB"
        else:
            with pytest.raises(ImageRejected) as info:
                decode_image(planted.data, max_pixels=1_000_000)
            assert info.value.reason.startswith(planted.expect), planted.name
