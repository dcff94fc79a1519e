"""The model card: everything needed to run an exported encoder and to trust it.

Every model in the registry has the same ONNX interface, so the encoder has one code
path: input ``images`` is uint8 NHWC RGB of ``input_size``; conversion to float and
normalisation happen inside the graph; output ``embedding`` is float32 [N, dim].
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

CARD_SCHEMA_VERSION = 1


class Preprocessing(BaseModel):
    """What happens to a decoded RGB image before it enters the graph."""

    resize_shorter: int = Field(description="Resize so the shorter side has this many pixels.")
    crop: int = Field(description="Then centre-crop a square of this size.")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    mean: list[float] = Field(description="Per-channel mean on [0,1] scale (applied in graph).")
    std: list[float] = Field(description="Per-channel std on [0,1] scale (applied in graph).")
    normalisation_in_graph: bool = True
    input_layout: Literal["NHWC"] = "NHWC"
    input_dtype: Literal["uint8"] = "uint8"


class ParityResult(BaseModel):
    """ONNX Runtime output compared with the source model on real images."""

    images: int
    image_source: str
    min_cosine: float
    max_abs_diff: float
    passed: bool
    threshold_cosine: float = 0.999


class ModelCard(BaseModel):
    schema_version: int = CARD_SCHEMA_VERSION
    name: str
    family: Literal["foundation", "domain"]
    source: str = Field(description="The export SPEC, e.g. open_clip:ViT-B-32:openai.")
    architecture: str
    weights: str = Field(description="Where the weights came from, or 'none' (random init).")
    pretrained: bool
    input_size: int
    preprocessing: Preprocessing
    embedding_dim: int
    params: int
    macs_per_image: int | None = Field(
        None,
        description="Multiply-accumulates for one image, counted from the ONNX graph (onnx-tool).",
    )
    file_size: int
    sha256: str
    opset: int
    input_name: str = "images"
    output_name: str = "embedding"
    parity: ParityResult | None = None
    exported_at: str
    exporter: dict[str, str] = Field(default_factory=dict, description="Library versions.")
    notes: list[str] = Field(default_factory=list)
