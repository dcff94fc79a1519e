"""Transformer graph fusion for ViT-family encoders (ONNX Runtime's offline optimiser).

``onnxruntime.transformers.optimizer.optimize_model(model_type="vit")`` rewrites LayerNorm
(+ residual → SkipLayerNormalization), GELU (+ bias → BiasGelu) and, where it recognises
the pattern, attention into contrib operators. The fused graph is stored only when it keeps
parity with the unfused one *and* is not slower, measured interleaved on the same crops and
threads; otherwise the unfused graph stays and the card says why (``card.fusion``).

Note: the ORT session already applies many of these fusions at load time
(``ORT_ENABLE_ALL``), so the offline pass pays mainly when it fuses attention.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from kiban.models.card import GraphFusion
from kiban_export.parity import cosines

THRESHOLD_COSINE = 0.9999
MIN_SPEEDUP = 1.0


def is_vit_family(source: str, architecture: str) -> bool:
    """open_clip (ViT towers) and timm / torchvision vit* models."""
    arch = architecture.lower()
    if source == "open_clip":
        return "vit" in arch
    return source in ("timm", "torchvision") and ("vit" in arch or "deit" in arch)


def fuse(
    path: Path, crops: np.ndarray, threads: int | None = None, model_type: str = "vit"
) -> GraphFusion:
    """Try the fused graph for ``path``; replace the file in place when it is kept."""
    from onnxruntime.transformers import optimizer

    from kiban_export.variants import _embed, default_threads, measure_rates

    threads = threads or default_threads()
    fused_path = path.with_name(path.stem + ".fused.onnx")
    try:
        model = optimizer.optimize_model(
            str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=1
        )
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(fused_path))
    except Exception as exc:  # noqa: BLE001 - any optimiser failure keeps the unfused graph
        return GraphFusion(applied=False, model_type=model_type, note=f"optimiser failed: {exc}")
    try:
        if not stats:
            return GraphFusion(
                applied=False, model_type=model_type, note="no fusion pattern matched"
            )
        unfused = _embed(path, crops, threads)
        fused = _embed(fused_path, crops, threads)
        min_cos = float(cosines(fused, unfused).min()) if np.isfinite(fused).all() else -1.0
        if min_cos < THRESHOLD_COSINE:
            return GraphFusion(
                applied=False,
                model_type=model_type,
                fusions=stats,
                min_cosine=min_cos,
                note=f"fused graph kept out: min cosine {min_cos:.6f} < {THRESHOLD_COSINE}",
            )
        rates = measure_rates({"unfused": path, "fused": fused_path}, crops, threads)
        speedup = round(rates["fused"] / rates["unfused"], 3)
        if speedup < MIN_SPEEDUP:
            return GraphFusion(
                applied=False,
                model_type=model_type,
                fusions=stats,
                min_cosine=min_cos,
                speedup=speedup,
                note=f"fused graph kept out: {speedup:.2f}× the unfused one here "
                f"({rates['fused']} vs {rates['unfused']} img/s, {threads} threads)",
            )
        shutil.move(str(fused_path), str(path))
        return GraphFusion(
            applied=True,
            model_type=model_type,
            fusions=stats,
            min_cosine=min_cos,
            speedup=speedup,
            note=f"{rates['fused']} vs {rates['unfused']} img/s unfused ({threads} threads)",
        )
    finally:
        fused_path.unlink(missing_ok=True)
