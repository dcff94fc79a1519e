"""The projection head: deterministic training, and the composed ONNX graph computes
base → L2-normalise → head exactly (ONNX Runtime against torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kiban_trainer.compose import compose, l2_normalise  # noqa: E402
from kiban_trainer.errors import TrainingError  # noqa: E402
from kiban_trainer.head import HeadConfig, apply_head, build_head, train_head  # noqa: E402

SMALL = HeadConfig(hidden_dim=32, out_dim=8, batch_size=16)


def _clusters(n_per: int = 30, dim: int = 24, classes: int = 3, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    x = np.concatenate([c + 0.8 * rng.normal(size=(n_per, dim)) for c in centres])
    y = np.repeat(np.arange(classes), n_per)
    return l2_normalise(x.astype(np.float32)), y


def test_same_seed_same_weights_and_losses_other_seed_differs() -> None:
    x, y = _clusters()
    a = train_head(x, y, epochs=5, seed=3, config=SMALL)
    b = train_head(x, y, epochs=5, seed=3, config=SMALL)
    c = train_head(x, y, epochs=5, seed=4, config=SMALL)
    assert a.loss_per_epoch == b.loss_per_epoch
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert a.loss_per_epoch != c.loss_per_epoch
    assert not torch.equal(a.module.fc1.weight, c.module.fc1.weight)
    assert not torch.are_deterministic_algorithms_enabled()  # restored afterwards


def test_training_lowers_the_loss_and_separates_classes() -> None:
    x, y = _clusters(seed=1)
    result = train_head(x, y, epochs=20, seed=0, config=SMALL)
    assert result.loss_per_epoch[-1] < 0.5 * result.loss_per_epoch[0]
    emb = l2_normalise(apply_head(result.module, x))
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)
    assert (y[nearest] == y).mean() > 0.95


def _base_onnx(path: Path, opset: int, size: int = 8, dim: int = 24, seed: int = 0) -> Path:
    """A tiny model with the standard interface: uint8 NHWC → float → flatten → linear."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(size * size * 3, dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["f", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["embedding"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        initializer=[
            numpy_helper.from_array(np.asarray([-1, size * size * 3], np.int64), "shape"),
            numpy_helper.from_array(w / 255.0, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@pytest.mark.parametrize("skip", [True, False])
def test_composed_graph_equals_base_then_normalise_then_head(
    tmp_path: Path, opset: int, skip: bool
) -> None:
    base = _base_onnx(tmp_path / "base.onnx", opset)
    head = build_head(24, HeadConfig(hidden_dim=32, out_dim=8, skip=skip), seed=1).eval()
    out = compose(base, head.layers(), tmp_path / "combined.onnx")
    x = np.random.default_rng(2).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    raw = _run(base, x)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # normalisation must matter
    expected = apply_head(head, l2_normalise(raw))
    got = _run(out, x)
    assert got.shape == (5, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # without the in-graph normalisation the result would be different
    assert not np.allclose(got, apply_head(head, raw), atol=1e-3)
    # dynamic batch axis: one image alone gives the same row
    np.testing.assert_allclose(_run(out, x[:1]), got[:1], rtol=1e-5, atol=1e-6)
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_compose_refuses_a_head_of_the_wrong_width(tmp_path: Path) -> None:
    base = _base_onnx(tmp_path / "base.onnx", 17, dim=24)
    head = build_head(12, HeadConfig(hidden_dim=8, out_dim=4), seed=0).eval()
    with pytest.raises(TrainingError, match="12-d input"):
        compose(base, head.layers(), tmp_path / "combined.onnx")


def test_default_head_epochs_shrink_on_large_sets_but_keep_a_step_budget() -> None:
    from kiban_trainer.train import HEAD_STEP_BUDGET, default_epochs

    assert default_epochs("head", 400) == 40  # the small sets a team starts with
    assert default_epochs("head", 10_000) == 13  # 78 steps an epoch: >= 1,000 steps
    assert default_epochs("head", 10_000) * round(10_000 / 128) >= HEAD_STEP_BUDGET
    assert default_epochs("head", 10**7) == 5
    assert default_epochs("finetune", 10_000) == 3
