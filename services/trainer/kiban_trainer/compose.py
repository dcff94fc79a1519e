"""Base model + trained head → ONE ONNX graph with the standard interface.

The head was trained on what the encoder *stores*: the base's output L2-normalised after the
graph (``kiban_encoder.encode.l2_normalise``: ``v / max(‖v‖₂, 1e-12)``). So the combined graph
is ``images`` (uint8 NHWC) → base graph → L2-normalise (same formula, in the graph) → head →
``embedding`` (float32 [N, D]); the encoder then normalises the head's output as it does for
every model, and nothing in the encoder knows this model is two parts.

The head is written with ``onnx.helper`` from its weights (Gemm, Relu, MatMul, Add) in the
base's own opset and IR version, and joined to the base with ``onnx.compose.merge_models``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiban_trainer.errors import TrainingError

BASE_OUTPUT = "kiban_base/embedding"
HEAD_PREFIX = "kiban_head/"
NORM_EPS = 1e-12  # kiban_encoder.encode.l2_normalise


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """The encoder's normalisation (kept identical: the head was trained on its output)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, NORM_EPS)


def default_opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise TrainingError("the base ONNX graph declares no default-domain opset")


def _batch_dim(value_info: Any) -> str:
    dims = value_info.type.tensor_type.shape.dim
    return dims[0].dim_param if dims and dims[0].dim_param else "batch"


def _rename_output(model: Any, old: str, new: str) -> None:
    """Rename the tensor ``old`` everywhere in the main graph (it is the graph's output)."""
    graph = model.graph
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for value in (*graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def head_graph(
    layers: dict[str, np.ndarray], in_dim: int, opset: int, ir_version: int, batch_dim: str
) -> Any:
    """The head as an ONNX model: ``kiban_head/input`` [N, in_dim] → ``embedding`` [N, out].

    ``layers`` are the ProjectionHead's weights (``fc1_weight`` [H, in], ``fc1_bias`` [H],
    ``fc2_weight`` [out, H], ``fc2_bias`` [out], optional ``skip_weight`` [out, in]).
    """
    from onnx import TensorProto, helper, numpy_helper

    p = HEAD_PREFIX
    out_dim = int(layers["fc2_weight"].shape[0])
    if layers["fc1_weight"].shape[1] != in_dim:
        raise TrainingError(
            f"the head expects {layers['fc1_weight'].shape[1]}-d input but the base outputs "
            f"{in_dim}-d embeddings"
        )
    inits = [
        numpy_helper.from_array(np.asarray([NORM_EPS], np.float32), f"{p}eps"),
        numpy_helper.from_array(layers["fc1_weight"].astype(np.float32), f"{p}fc1_weight"),
        numpy_helper.from_array(layers["fc1_bias"].astype(np.float32), f"{p}fc1_bias"),
        numpy_helper.from_array(layers["fc2_weight"].astype(np.float32), f"{p}fc2_weight"),
        numpy_helper.from_array(layers["fc2_bias"].astype(np.float32), f"{p}fc2_bias"),
    ]
    x = f"{p}input"
    if opset >= 18:  # ReduceL2's axes became an input in opset 18
        inits.append(numpy_helper.from_array(np.asarray([1], np.int64), f"{p}axes"))
        reduce = helper.make_node(
            "ReduceL2", [x, f"{p}axes"], [f"{p}norm"], keepdims=1, name=f"{p}ReduceL2"
        )
    else:
        reduce = helper.make_node(
            "ReduceL2", [x], [f"{p}norm"], axes=[1], keepdims=1, name=f"{p}ReduceL2"
        )
    nodes = [
        reduce,
        helper.make_node("Max", [f"{p}norm", f"{p}eps"], [f"{p}den"], name=f"{p}Max"),
        helper.make_node("Div", [x, f"{p}den"], [f"{p}normalised"], name=f"{p}Div"),
        helper.make_node(
            "Gemm",
            [f"{p}normalised", f"{p}fc1_weight", f"{p}fc1_bias"],
            [f"{p}hidden"],
            transB=1,
            name=f"{p}fc1",
        ),
        helper.make_node("Relu", [f"{p}hidden"], [f"{p}relu"], name=f"{p}relu"),
    ]
    last = "embedding"
    if "skip_weight" in layers:
        inits.append(
            numpy_helper.from_array(
                np.ascontiguousarray(layers["skip_weight"].T.astype(np.float32)), f"{p}skip_weight"
            )
        )
        last = f"{p}mlp"
        nodes += [
            helper.make_node(
                "Gemm",
                [f"{p}relu", f"{p}fc2_weight", f"{p}fc2_bias"],
                [last],
                transB=1,
                name=f"{p}fc2",
            ),
            helper.make_node(
                "MatMul", [f"{p}normalised", f"{p}skip_weight"], [f"{p}skip"], name=f"{p}skip"
            ),
            helper.make_node("Add", [last, f"{p}skip"], ["embedding"], name=f"{p}add"),
        ]
    else:
        nodes.append(
            helper.make_node(
                "Gemm",
                [f"{p}relu", f"{p}fc2_weight", f"{p}fc2_bias"],
                ["embedding"],
                transB=1,
                name=f"{p}fc2",
            )
        )
    graph = helper.make_graph(
        nodes,
        "kiban_head",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch_dim, in_dim])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch_dim, out_dim])],
        initializer=inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def compose(
    base_path: Path,
    layers: dict[str, np.ndarray],
    out_path: Path,
    input_name: str = "images",
    output_name: str = "embedding",
    doc: str = "",
) -> Path:
    """Write ``out_path``: the base graph, L2-normalise, the head; checked by the ONNX checker."""
    import onnx
    import onnx.compose

    base = onnx.load(str(base_path))
    outputs = [o for o in base.graph.output]
    if [o.name for o in outputs] != [output_name] or input_name not in {
        i.name for i in base.graph.input
    }:
        raise TrainingError(
            f"base graph {base_path.name} does not have the standard interface "
            f"(inputs {[i.name for i in base.graph.input]}, outputs {[o.name for o in outputs]})"
        )
    dims = outputs[0].type.tensor_type.shape.dim
    in_dim = int(layers["fc1_weight"].shape[1])
    if len(dims) == 2 and dims[1].dim_value and dims[1].dim_value != in_dim:
        raise TrainingError(
            f"the head expects {in_dim}-d input but {base_path.name} outputs "
            f"{dims[1].dim_value}-d embeddings"
        )
    batch_dim = _batch_dim(outputs[0])
    _rename_output(base, output_name, BASE_OUTPUT)
    head = head_graph(layers, in_dim, default_opset(base), base.ir_version, batch_dim)
    try:
        merged = onnx.compose.merge_models(
            base, head, io_map=[(BASE_OUTPUT, f"{HEAD_PREFIX}input")], doc_string=doc
        )
    except Exception as exc:  # noqa: BLE001 - onnx raises ValueError and friends
        raise TrainingError(f"could not join the head to {base_path.name}: {exc}") from exc
    if output_name != "embedding":
        _rename_output(merged, "embedding", output_name)
    merged.graph.name = f"{base.graph.name or 'base'}+kiban_head"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(merged, str(out_path))
    try:
        onnx.checker.check_model(str(out_path))
    except Exception as exc:  # noqa: BLE001
        raise TrainingError(f"the combined graph fails the ONNX checker: {exc}") from exc
    return out_path
