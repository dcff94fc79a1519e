"""``export_model``: spec → ONNX file with the standard interface → filled model card.

Publishing is the caller's job (``kiban.models.registry.publish``); this function only
writes into ``workdir``. A failed parity check is *reported* (``card.parity.passed``),
not raised, so the CLI can decide; real errors raise ExportError subclasses.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from kiban.messages import is_valid_name
from kiban.models.card import ModelCard, ParityResult, Preprocessing
from kiban.models.registry import sha256_file
from kiban_export.errors import ExportError
from kiban_export.macs import count_macs
from kiban_export.options import OnnxOptions
from kiban_export.spec import ExportSpec, parse_spec

__all__ = ["FAMILIES", "export_model", "sha256_file"]

FAMILIES = ("foundation", "domain")


def export_model(
    spec: str,
    name: str,
    family: str | None,
    workdir: Path,
    parity_images: list[Image.Image],
    opset: int = 17,
    onnx_options: OnnxOptions | None = None,
    parity_source: str = "synthetic",
    fuse: bool = False,
) -> tuple[ModelCard, Path]:
    """Export ``spec`` to ``workdir/<name>.onnx`` and return its card and path.

    ``parity_images`` are any RGB images (at least one); ``parity_source`` says where they
    came from (recorded on the card). ``onnx_options`` is only for ``onnx:PATH`` specs.
    ``fuse``: for ViT-family encoders, try ONNX Runtime's transformer fusions and keep the
    fused graph when parity holds and it is not slower (``kiban_export.fusion``).
    """
    if not is_valid_name(name):
        raise ExportError(f"invalid model name {name!r}: use letters, digits, . _ -")
    if family is not None and family not in FAMILIES:
        raise ExportError(f"family must be one of {FAMILIES}, not {family!r}")
    if not parity_images:
        raise ExportError("parity needs at least one image")
    if not 7 <= opset <= 25:
        raise ExportError(f"opset {opset} is outside the supported range 7..25")
    parsed = parse_spec(spec)
    if onnx_options is not None and parsed.source != "onnx":
        raise ExportError("ONNX options (input size, mean, std, layout...) apply only to onnx:PATH")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = workdir / f"{name}.onnx"
    started = time.perf_counter()
    if parsed.source == "onnx":
        facts = _export_onnx(
            parsed, onnx_options or OnnxOptions(), out_path, parity_images, parity_source
        )
    else:
        facts = _export_torch(parsed, out_path, opset, parity_images, parity_source)
    fusion = None
    if fuse and parsed.source != "onnx":
        from kiban_export import fusion as fusion_mod
        from kiban_export.parity import make_crops

        if fusion_mod.is_vit_family(parsed.source, facts["architecture"]):
            crops = make_crops(parity_images, facts["preprocessing"], minimum=8)
            fusion = fusion_mod.fuse(out_path, crops)
            facts["notes"].append(f"graph fusion: {fusion.note or 'applied'}")
    facts["notes"].append(f"export + parity took {time.perf_counter() - started:.1f} s")
    card = ModelCard(
        name=name,
        family=family or facts["default_family"],
        source=parsed.raw,
        architecture=facts["architecture"],
        weights=facts["weights"],
        pretrained=facts["pretrained"],
        input_size=facts["preprocessing"].crop,
        preprocessing=facts["preprocessing"],
        embedding_dim=facts["embedding_dim"],
        params=facts["params"],
        macs_per_image=count_macs(out_path, facts["preprocessing"].crop),
        file_size=out_path.stat().st_size,
        sha256=sha256_file(out_path),
        opset=facts["opset"],
        parity=facts["parity"],
        fusion=fusion,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        exporter=facts["versions"],
        notes=facts["notes"],
    )
    return card, out_path


def _versions(**extra: str) -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, **extra}


def _export_torch(
    spec: ExportSpec, out_path: Path, opset: int, images: list[Image.Image], source: str
) -> dict[str, Any]:
    import torch

    from kiban_export import parity
    from kiban_export.builders import build
    from kiban_export.torch_export import export_torch

    built = build(spec)
    prep: Preprocessing = built.preprocessing
    export_torch(
        built.module,
        prep.mean,
        prep.std,
        prep.crop,
        out_path,
        opset,
        # Always off: torchvision ViTs use nn.MultiheadAttention too, and it costs nothing.
        disable_mha_fastpath=True,
    )
    crops = parity.make_crops(images, prep)
    graph = parity.run_graph(out_path, crops)

    def forward(x: Any) -> Any:
        with torch.no_grad():
            return built.module(torch.from_numpy(x)).float().numpy()

    reference = parity.torch_reference(forward, parity.normalise(crops, prep.mean, prep.std))
    result: ParityResult = parity.compare(graph, reference, len(images), source)
    return {
        "default_family": built.default_family,
        "architecture": built.architecture,
        "weights": built.weights,
        "pretrained": built.pretrained,
        "preprocessing": prep,
        "embedding_dim": int(graph.batched.shape[1]),
        "params": int(sum(p.numel() for p in built.param_module.parameters())),
        "opset": opset,
        "parity": result,
        "versions": _versions(**built.versions),
        "notes": list(built.notes),
    }


def _export_onnx(
    spec: ExportSpec, options: OnnxOptions, out_path: Path, images: list[Image.Image], source: str
) -> dict[str, Any]:
    from kiban_export import onnx_wrap, parity

    assert spec.weights_file is not None  # parse_spec guarantees it for onnx:
    src = onnx_wrap.inspect_source(spec.weights_file, options)
    if out_path.resolve() == spec.weights_file.resolve():
        raise ExportError(f"output {out_path} would overwrite the source ONNX file")
    onnx_wrap.wrap_onnx(src, options, out_path)
    prep = Preprocessing(
        resize_shorter=options.resize_shorter or options.input_size,
        crop=options.input_size,
        interpolation=options.interpolation,
        mean=list(options.mean),
        std=list(options.std),
    )
    crops = parity.make_crops(images, prep)
    graph = parity.run_graph(out_path, crops)
    original = parity.ort_session(spec.weights_file)
    x = onnx_wrap.reference_input(crops, options)
    try:
        raw = original.run([src.output_name], {src.input_name: x})[0]
    except Exception:  # noqa: BLE001 - fixed-batch source graph: run it image by image
        import numpy as np

        raw = np.concatenate(
            [
                original.run([src.output_name], {src.input_name: x[i : i + 1]})[0]
                for i in range(len(x))
            ]
        )
    reference = onnx_wrap.reduce_output(raw, options)
    notes = [
        f"wrapped ONNX graph {spec.weights_file.name}: input {src.input_name!r} "
        f"({options.layout}, {options.input_dtype}), "
        f"output {src.output_name!r} (rank {src.output_rank})"
    ]
    if options.input_dtype == "uint8":
        notes.append(
            "source graph takes raw uint8 pixels and normalises itself; mean/std not applied"
        )
    if src.output_rank > 2:
        how = (
            "global average pool + flatten"
            if onnx_wrap._pool(src.output_rank, options)
            else "flatten"
        )
        notes.append(f"output reduced to [N, D] by {how}")
    return {
        "default_family": "domain",
        "architecture": f"onnx:{src.model.graph.name or spec.weights_file.stem}",
        "weights": str(spec.weights_file),
        "pretrained": True,
        "preprocessing": prep,
        "embedding_dim": int(graph.batched.shape[1]),
        "params": src.params,
        "opset": src.opset,
        "parity": parity.compare(graph, reference, len(images), source),
        "versions": _versions(),
        "notes": notes,
    }
