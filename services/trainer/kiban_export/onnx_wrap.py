"""Wrap a bring-your-own ONNX graph so it has the standard interface.

The user's graph is kept intact (every name prefixed with ``src/`` so nothing can clash)
and merged between a small pre-graph (uint8 NHWC → Cast → /255 → -mean → /std →
Transpose) and a post-graph (global pool / flatten to [N, D], cast to float32, rename to
``embedding``). Only standard opset-1..13 operators are added, so any reasonably modern
graph can be wrapped without re-exporting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiban_export.errors import ExportError
from kiban_export.options import OnnxOptions
from kiban_export.torch_export import INPUT_NAME, OUTPUT_NAME

PREFIX = "src/"


@dataclass
class SourceGraph:
    """Facts about the user's graph that the wrapper and parity need."""

    model: Any  # onnx.ModelProto, as loaded
    input_name: str
    output_name: str
    output_rank: int
    output_elem_type: int
    params: int
    opset: int


def _dims(value_info: Any) -> list[int | str | None]:
    shape = value_info.type.tensor_type.shape
    if not value_info.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def inspect_source(path: Path, options: OnnxOptions) -> SourceGraph:
    """Load the user's ONNX file and pick the input/output to use, with clear errors."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{path} is not a valid ONNX model: {exc}") from exc
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if options.input_name:
        chosen = [i for i in inputs if i.name == options.input_name]
        if not chosen:
            raise ExportError(
                f"{path} has no input {options.input_name!r} (inputs: {[i.name for i in inputs]})"
            )
        if len(inputs) > 1:
            raise ExportError(f"{path} has several inputs {[i.name for i in inputs]}; need one")
        model_input = chosen[0]
    elif len(inputs) != 1:
        raise ExportError(f"{path} must have exactly one input, has {[i.name for i in inputs]}")
    else:
        model_input = inputs[0]
    in_dims = _dims(model_input)
    if in_dims and len(in_dims) != 4:
        raise ExportError(f"input {model_input.name!r} has rank {len(in_dims)}, expected 4")
    spatial = in_dims[2:4] if options.layout == "NCHW" else in_dims[1:3]
    channels = in_dims[1] if options.layout == "NCHW" else (in_dims[3] if in_dims else None)
    if isinstance(channels, int) and channels != 3:
        raise ExportError(
            f"input {model_input.name!r} has {channels} channels in {options.layout} layout; "
            "expected 3 (is the layout option right?)"
        )
    for dim in spatial:
        if isinstance(dim, int) and dim not in (0, options.input_size):
            raise ExportError(
                f"input {model_input.name!r} has fixed spatial size {spatial}; "
                f"input_size option is {options.input_size}"
            )
    want_dtype = (
        onnx.TensorProto.FLOAT if options.input_dtype == "float32" else onnx.TensorProto.UINT8
    )
    if model_input.type.tensor_type.elem_type != want_dtype:
        got = onnx.TensorProto.DataType.Name(model_input.type.tensor_type.elem_type)
        raise ExportError(
            f"input {model_input.name!r} is {got}, but input_dtype option is {options.input_dtype}"
        )
    outputs = {o.name: o for o in graph.output}
    out_name = options.output_name or graph.output[0].name
    if out_name not in outputs:
        raise ExportError(f"{path} has no output {out_name!r} (outputs: {list(outputs)})")
    out = outputs[out_name]
    rank = len(_dims(out))
    if rank == 0:
        rank = _probe_rank(path, model_input.name, out_name, options)
    params = int(sum(int(np.prod(t.dims)) for t in graph.initializer))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 7:
        raise ExportError(f"{path} uses opset {opset}; wrapping needs opset >= 7")
    return SourceGraph(
        model=model,
        input_name=model_input.name,
        output_name=out_name,
        output_rank=rank,
        output_elem_type=out.type.tensor_type.elem_type,
        params=params,
        opset=opset,
    )


def _probe_rank(path: Path, input_name: str, output_name: str, options: OnnxOptions) -> int:
    """The output's rank is not declared: run the graph once on zeros to find it."""
    from kiban_export.parity import ort_session

    session = ort_session(path)
    s = options.input_size
    shape = (1, 3, s, s) if options.layout == "NCHW" else (1, s, s, 3)
    dtype = np.float32 if options.input_dtype == "float32" else np.uint8
    out = session.run([output_name], {input_name: np.zeros(shape, dtype)})[0]
    return int(out.ndim)


def reference_input(crops: np.ndarray, options: OnnxOptions) -> np.ndarray:
    """What the user's original graph expects, made in numpy from uint8 NHWC crops."""
    from kiban_export.parity import normalise

    x = normalise(crops, options.mean, options.std) if options.input_dtype == "float32" else crops
    if options.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def reduce_output(out: np.ndarray, options: OnnxOptions) -> np.ndarray:
    """The numpy twin of the post-graph."""
    if out.ndim > 2 and _pool(out.ndim, options):
        out = out.mean(axis=tuple(range(2, out.ndim)))
    return out.reshape(out.shape[0], -1).astype(np.float32)


def _pool(rank: int, options: OnnxOptions) -> bool:
    return options.reduce == "global_pool" or (options.reduce == "auto" and rank == 4)


def _make_dynamic_batch(model: Any, input_name: str, output_name: str) -> None:
    """Mark dim 0 of the used input/output as symbolic; drop stale intermediate shapes."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in (input_name, output_name) and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if dims:
                dims[0].Clear()
                dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    keep = [o for o in model.graph.output if o.name == output_name]
    del model.graph.output[:]
    model.graph.output.extend(keep)


def wrap_onnx(source: SourceGraph, options: OnnxOptions, out_path: Path) -> None:
    """Write the wrapped graph to ``out_path`` as one self-contained file."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    user = onnx.ModelProto()
    user.CopyFrom(source.model)
    _make_dynamic_batch(user, source.input_name, source.output_name)
    user = compose.add_prefix(user, PREFIX)
    opsets = [helper.make_opsetid("", source.opset)]
    s = options.input_size

    # ---- pre-graph: images (uint8 NHWC) -> what the user's input expects
    nodes, inits = [], []
    current = INPUT_NAME
    if options.input_dtype == "float32":
        inits += [
            numpy_helper.from_array(np.array(255.0, np.float32), "pre/255"),
            numpy_helper.from_array(
                np.asarray(options.mean, np.float32).reshape(1, 1, 1, 3), "pre/mean"
            ),
            numpy_helper.from_array(
                np.asarray(options.std, np.float32).reshape(1, 1, 1, 3), "pre/std"
            ),
        ]
        nodes += [
            helper.make_node("Cast", [current], ["pre/float"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["pre/float", "pre/255"], ["pre/unit"]),
            helper.make_node("Sub", ["pre/unit", "pre/mean"], ["pre/centred"]),
            helper.make_node("Div", ["pre/centred", "pre/std"], ["pre/normalised"]),
        ]
        current = "pre/normalised"
    if options.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [current], ["pre/nchw"], perm=[0, 3, 1, 2]))
        current = "pre/nchw"
    nodes.append(helper.make_node("Identity", [current], ["pre/out"]))
    in_elem = TensorProto.FLOAT if options.input_dtype == "float32" else TensorProto.UINT8
    out_shape = ["batch", 3, s, s] if options.layout == "NCHW" else ["batch", s, s, 3]
    pre = helper.make_model(
        helper.make_graph(
            nodes,
            "kiban_pre",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", s, s, 3])],
            [helper.make_tensor_value_info("pre/out", in_elem, out_shape)],
            initializer=inits,
        ),
        opset_imports=opsets,
        ir_version=user.ir_version,
    )

    # ---- post-graph: user's output -> embedding float32 [N, D]
    rank = source.output_rank
    nodes = []
    current = "post/in"
    if rank > 2 and _pool(rank, options):
        nodes.append(helper.make_node("GlobalAveragePool", [current], ["post/pooled"]))
        current = "post/pooled"
    if rank != 2:
        nodes.append(helper.make_node("Flatten", [current], ["post/flat"], axis=1))
        current = "post/flat"
    if source.output_elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [current], ["post/f32"], to=TensorProto.FLOAT))
        current = "post/f32"
    nodes.append(helper.make_node("Identity", [current], [OUTPUT_NAME]))
    post = helper.make_model(
        helper.make_graph(
            nodes,
            "kiban_post",
            [helper.make_tensor_value_info("post/in", source.output_elem_type, None)],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", None])],
        ),
        opset_imports=opsets,
        ir_version=user.ir_version,
    )
    try:
        merged = compose.merge_models(pre, user, io_map=[("pre/out", PREFIX + source.input_name)])
        merged = compose.merge_models(
            merged, post, io_map=[(PREFIX + source.output_name, "post/in")]
        )
        merged.graph.name = "kiban_wrapped_" + (source.model.graph.name or "onnx")
        onnx.checker.check_model(merged)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"could not wrap the ONNX graph: {exc}") from exc
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(merged, str(out_path), save_as_external_data=False)
