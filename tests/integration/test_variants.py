"""Precision variants (`kiban models quantize`) and fused ViT graphs, on real exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the `export` extra (torch)")
pytest.importorskip("onnxruntime", reason="needs onnxruntime")

from kiban.models.card import ModelCard  # noqa: E402
from kiban.models.registry import load_card, publish  # noqa: E402
from kiban_export.variants import as_crops, neighbour_overlap, quantize_model  # noqa: E402

pytestmark = pytest.mark.integration


def test_neighbour_overlap_counts_shared_top_k() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8))
    assert neighbour_overlap(a, a) == 1.0
    assert neighbour_overlap(a, a * 3.0) == 1.0  # scale-free (cosine)
    assert neighbour_overlap(a, rng.normal(size=(20, 8))) < 0.6


def _crops(card: ModelCard, n: int, seed: int):  # type: ignore[no-untyped-def]
    from kiban_cli.synthetic import sample_images

    return as_crops(sample_images(n=n, seed=seed), card.preprocessing)


def test_int8_variant_of_effnet_is_a_model_that_joins_a_report(
    effnet_lite0: tuple[ModelCard, Path], tmp_path: Path
) -> None:
    from kiban.pipeline import run_batch
    from kiban.settings import Settings
    from kiban.store import open_store
    from kiban_cli.synthetic import generate_texture_dataset

    parent, parent_path = effnet_lite0
    card, path = quantize_model(
        parent,
        parent_path,
        "effnet-lite0-int8",
        tmp_path / "work",
        "int8",
        _crops(parent, 8, seed=1),
        _crops(parent, 12, seed=2),
        mode="static",
        min_overlap=0.0,
        threads=2,
    )
    info = card.variant
    assert info is not None
    assert (info.parent, info.parent_sha256) == (parent.name, parent.sha256)
    assert (info.precision, info.mode) == ("int8", "static-qdq")
    assert info.calibration_images == 8 and info.validation_images == 12
    assert info.calibration_batch is None  # synthetic crops: no batch, no digest
    assert 0.5 < info.min_cosine <= 1.0 + 1e-6 and 0.0 <= info.neighbour_overlap <= 1.0
    assert info.within_tolerance and info.neighbour_k == 5
    assert info.speedup > 0 and set(info.images_per_second) == {"parent", "static-qdq"}
    assert "cores" in info.machine and info.threads == 2
    assert card.source == "variant:effnet-lite0:int8" and card.parity is None
    assert card.sha256 != parent.sha256 and card.file_size < parent.file_size

    # a registered model like any other: the encoder runs it and the report lists it
    home = tmp_path / "home"
    settings = Settings(home=home, chunk_size=32)
    store = open_store(settings.resolved_store_uri, create=True)
    publish(store, parent, parent_path)
    publish(store, card, path)
    assert load_card(store, card.name).variant == info
    images = tmp_path / "images"
    generate_texture_dataset(images, n_classes=3, per_class=6, size=64, groups_per_class=3)
    report = run_batch(
        settings,
        images.as_uri(),
        [parent.name, card.name],
        manifest=(images / "manifest.csv").as_uri(),
    )
    assert {m["name"] for m in report["models"]} == {parent.name, card.name}


def test_variant_outside_tolerance_carries_a_warning(
    effnet_lite0: tuple[ModelCard, Path], tmp_path: Path
) -> None:
    parent, parent_path = effnet_lite0
    crops = _crops(parent, 8, seed=3)
    card, _ = quantize_model(
        parent,
        parent_path,
        "effnet-lite0-strict",
        tmp_path,
        "int8",
        crops,
        crops,
        mode="static",
        min_overlap=1.01,  # unattainable: overlap is at most 1
        threads=2,
    )
    assert card.variant is not None and not card.variant.within_tolerance
    assert any("KIBAN_VARIANT_MIN_OVERLAP" in w for w in card.variant.warnings)


@pytest.mark.slow
def test_dynamic_int8_vit_and_fused_graph(tmp_path: Path) -> None:
    from kiban_cli.synthetic import sample_images
    from kiban_export import export_model

    card, path = export_model(
        "open_clip:ViT-S-32", "vit-s", "foundation", tmp_path, sample_images(n=8), fuse=True
    )
    assert card.fusion is not None and card.fusion.model_type == "vit"
    assert card.fusion.fusions.get("SkipLayerNormalization", 0) > 0
    assert card.fusion.min_cosine is not None and card.fusion.min_cosine >= 0.9999
    assert card.fusion.applied == (card.fusion.speedup is not None and card.fusion.speedup >= 1)
    variant, _ = quantize_model(
        card,
        path,
        "vit-s-int8",
        tmp_path / "q",
        "int8",
        _crops(card, 8, 1),
        _crops(card, 12, 2),
        mode="dynamic",
        threads=2,
    )
    assert variant.variant is not None and variant.variant.mode == "dynamic"
    assert variant.variant.min_cosine > 0.99
