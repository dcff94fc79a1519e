"""Export a torch embedding module, wrapped in the standard interface, to one ONNX file.

The classic TorchScript exporter (``dynamo=False``) is used: on this torch it handles
both CNNs and open_clip ViTs (with the MHA fast path off) and writes one self-contained
file, which is what the registry stores.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiban_export.errors import ExportError

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"


@contextlib.contextmanager
def _mha_fastpath_disabled(disable: bool) -> Iterator[None]:
    """nn.MultiheadAttention's fast path does not trace with the classic exporter."""
    import torch

    if not disable:
        yield
        return
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_torch(
    module: Any,
    mean: list[float],
    std: list[float],
    size: int,
    path: Path,
    opset: int,
    disable_mha_fastpath: bool = False,
) -> Any:
    """Write ``path``; return the wrapped module (the exact thing that was exported)."""
    import onnx
    import torch

    from kiban_export.wrapper import StandardInterface

    wrapped = StandardInterface(module, mean, std).eval()
    dummy = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        _mha_fastpath_disabled(disable_mha_fastpath),
        torch.no_grad(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapped,
                (dummy,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(f"torch.onnx.export failed (opset {opset}): {exc}") from exc
    extra = [p.name for p in path.parent.glob(path.name + ".*") if p != path]
    if extra:
        raise ExportError(f"export wrote external data {extra}; the model is too big for one file")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"exported graph {path} fails the ONNX checker: {exc}") from exc
    return wrapped
