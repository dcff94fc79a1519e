"""Spec parsing for `kiban models export SPEC`: every accepted form and the clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kiban.errors import KibanError
from kiban_export import ExportError, OnnxOptions, SpecError, parse_spec
from kiban_export.checkpoint import LoadReport


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not really weights; parsing only checks existence")
    return path


def test_efficientnet_lite0() -> None:
    spec = parse_spec("efficientnet-lite0")
    assert (spec.source, spec.arch, spec.weights, spec.weights_file) == (
        "efficientnet-lite0",
        "efficientnet-lite0",
        None,
        None,
    )
    assert not spec.random_init


def test_open_clip_random_init() -> None:
    spec = parse_spec("open_clip:ViT-B-32")
    assert (spec.source, spec.arch, spec.weights) == ("open_clip", "ViT-B-32", None)
    assert spec.random_init


def test_open_clip_pretrained_tag_is_passed_through() -> None:
    spec = parse_spec("open_clip:ViT-B-32:openai")
    assert spec.weights == "openai" and spec.weights_file is None and not spec.random_init


def test_open_clip_checkpoint_file(ckpt: Path) -> None:
    spec = parse_spec(f"open_clip:RN50:{ckpt}")
    assert spec.arch == "RN50"
    assert spec.weights_file == ckpt.resolve()
    assert spec.weights == str(ckpt.resolve())


@pytest.mark.parametrize(
    ("text", "arch"),
    [
        ("open_clip:hf-hub:vinid/plip", "hf-hub:vinid/plip"),
        ("open_clip:ViT-B-32:hf-hub:wisdomik/QuiltNet-B-32", "hf-hub:wisdomik/QuiltNet-B-32"),
    ],
)
def test_open_clip_hub_names(text: str, arch: str) -> None:
    spec = parse_spec(text)
    assert spec.arch == arch and spec.weights == arch and spec.weights_file is None


def test_open_clip_missing_checkpoint_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(f"open_clip:ViT-B-32:{tmp_path}/nope.pt")


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_local_weight_sources(source: str, ckpt: Path) -> None:
    bare = parse_spec(f"{source}:densenet121")
    assert (bare.source, bare.arch, bare.weights_file) == (source, "densenet121", None)
    assert bare.random_init
    full = parse_spec(f"{source}:densenet121:{ckpt}")
    assert full.weights_file == ckpt.resolve() and not full.random_init


def test_torchvision_weights_must_be_a_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec("torchvision:densenet121:IMAGENET1K_V1")
    with pytest.raises(SpecError, match="not a file"):
        parse_spec(f"torchvision:densenet121:{tmp_path}")


def test_onnx(tmp_path: Path) -> None:
    path = tmp_path / "net.onnx"
    path.write_bytes(b"x")
    spec = parse_spec(f"onnx:{path}")
    assert (spec.source, spec.arch, spec.weights_file) == ("onnx", "net", path.resolve())
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(f"onnx:{tmp_path}/missing.onnx")


def test_whitespace_is_stripped() -> None:
    assert parse_spec("  open_clip:RN50 ").raw == "open_clip:RN50"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("resnet50", "no source prefix"),
        ("keras:resnet50", "unknown source 'keras'"),
        ("huggingface:vinid/plip", "unknown source"),
        ("open_clip:", "needs an architecture"),
        ("open_clip:ViT-B-32:", "empty pretrained"),
        ("open_clip:hf-hub:", "hub name is empty"),
        ("torchvision:", "needs a model name"),
        ("timm::w.pt", "needs a model name"),
        ("timm:resnet18:", "empty weights"),
        ("onnx:", "needs a file path"),
    ],
)
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        parse_spec(text)
    assert "Accepted forms" in str(info.value) or "does not exist" in str(info.value)


def test_errors_are_kiban_errors() -> None:
    assert issubclass(SpecError, ExportError) and issubclass(ExportError, KibanError)


def test_onnx_options_validation() -> None:
    opts = OnnxOptions(input_size=64, mean=[0.5] * 3, std=[0.5] * 3, layout="NHWC")
    assert opts.layout == "NHWC" and opts.input_dtype == "float32"
    with pytest.raises(ValueError, match="exactly 3"):
        OnnxOptions(mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="> 0"):
        OnnxOptions(std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError):
        OnnxOptions(layout="CHW")  # type: ignore[arg-type]


def test_load_report_notes_name_what_was_ignored() -> None:
    report = LoadReport(stripped_prefixes=["module."], ignored_keys=["fc.weight", "fc.bias"])
    notes = report.notes(Path("/w/kimianet.pth"))
    assert any("module." in n for n in notes)
    assert any("fc.bias, fc.weight" in n for n in notes)


def test_package_import_is_cheap() -> None:
    """Importing kiban_export (the CLI does, for `kiban models export`) must not load torch."""
    import subprocess

    code = "import sys, kiban_export; print(any(m in sys.modules for m in ('torch', 'onnx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
