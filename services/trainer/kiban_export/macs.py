"""Compute cost counted from the exported graph itself: multiply-accumulates per image.

Throughput depends on the machine; MACs do not. Counting them from the ONNX graph that
the encoder really runs (after wrapping: the uint8 → float conversion and normalisation
are in it too) lets the report compare models' compute on any hardware. The counting is
done by the maintained ``onnx-tool`` profiler (shape inference + per-operator MACs), not a
hand table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def count_macs(model_path: Path, input_size: int, input_name: str = "images") -> int | None:
    """MACs for one ``input_size`` x ``input_size`` uint8 NHWC image, or None if not countable.

    A graph the profiler cannot shape-infer (an unusual operator) leaves the figure out with
    a warning: the export still succeeds.
    """
    import onnx_tool

    try:
        model = onnx_tool.Model(str(model_path))
        sample = np.zeros((1, input_size, input_size, 3), dtype=np.uint8)
        model.graph.shape_infer({input_name: sample})
        model.graph.profile()
        macs = model.graph.macs
        total = float(macs[0] if isinstance(macs, (list, tuple)) else macs)
    except Exception as exc:  # noqa: BLE001 - a third-party profiler on arbitrary graphs
        log.warning("could not count MACs of %s: %s", model_path.name, exc)
        return None
    return int(round(total)) if total > 0 else None
