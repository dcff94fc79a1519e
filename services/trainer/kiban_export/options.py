"""Options describing a bring-your-own ONNX file (``onnx:PATH``).

A foreign ONNX graph says nothing about how its input must be prepared, so the person
exporting it states it here; the wrapper then bakes exactly that into the graph so the
encoder keeps its single uint8-NHWC code path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class OnnxOptions(BaseModel):
    """How the user's ONNX graph expects its input, and which output is the embedding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(224, ge=8, le=4096, description="Square input side in pixels.")
    resize_shorter: int | None = Field(
        None, ge=8, description="Resize shorter side to this before cropping; default = input_size."
    )
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD))
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    input_dtype: Literal["float32", "uint8"] = Field(
        "float32",
        description="float32: the graph wants normalised floats (we prepend /255, mean, std); "
        "uint8: the graph takes raw pixels and normalises itself (mean/std are not applied).",
    )
    input_name: str | None = Field(None, description="Graph input to feed; default the first.")
    output_name: str | None = Field(None, description="Graph output to use; default the first.")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    reduce: Literal["auto", "flatten", "global_pool"] = Field(
        "auto",
        description="How a >2-D output becomes [N, D]: global_pool averages axes 2.. "
        "(NCHW feature maps), flatten keeps everything; auto pools rank-4 and flattens the rest.",
    )

    @field_validator("mean", "std")
    @classmethod
    def _three_channels(cls, value: list[float]) -> list[float]:
        if len(value) != 3:
            raise ValueError("must have exactly 3 values (R, G, B)")
        return value

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError("std values must be > 0")
        return value
