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


class TrainingProvenance(BaseModel):
    """How a trained specialist was made: enough to redo it and to prove what it never saw.

    The training set's sha256 list is stored beside the model
    (``models/<name>/training-set.json``, ``kiban.models.registry.load_training_set``); the
    reporter excludes those images from the queries of any evaluation of this model.
    """

    mode: Literal["head", "finetune"]
    base_model: str = Field(description="Registry name (or export spec) of the base network.")
    base_source: str = Field(description="The base's export spec.")
    batches: list[str]
    split: str = Field(description="Which images of the batches were trained on, and why.")
    training_set_sha256: str = Field(
        description="sha256 of the sorted image sha256s (one per line) trained on."
    )
    n_images: int
    images_per_class: dict[str, int]
    objective: str = Field(
        description="Loss (and miner), e.g. 'arcface (pytorch-metric-learning)'."
    )
    epochs: int
    seed: int
    loss_per_epoch: list[float]
    wall_seconds: float
    device: str = Field(description="Where it trained, e.g. 'cpu (AMD EPYC, 2 threads)'.")
    libraries: dict[str, str] = Field(default_factory=dict, description="Library versions.")


class VariantInfo(BaseModel):
    """A precision variant of a registered model (`kiban models quantize`): what it was made
    from, how, and what it costs in retrieval agreement with its parent. The paired MV@k
    difference with its CI comes from a normal report that includes both models."""

    parent: str = Field(description="Registry name of the parent model.")
    parent_sha256: str
    precision: Literal["int8", "fp16"]
    mode: Literal["dynamic", "static-qdq", "fp16"]
    calibration_batch: str | None = Field(
        None, description="Batch whose images calibrated a static variant (None: synthetic)."
    )
    calibration_sha256: str | None = Field(
        None, description="sha256 of the calibration images' sorted sha256s, one per line."
    )
    calibration_images: int = 0
    validation_batch: str | None = Field(None, description="Batch of the parity images.")
    validation_sha256: str | None = None
    validation_images: int
    min_cosine: float = Field(description="Worst cosine, variant vs parent embedding.")
    mean_cosine: float
    neighbour_k: int
    neighbour_overlap: float = Field(
        description="Mean share of each image's top-k neighbours (cosine, self excluded) that "
        "the variant and its parent agree on."
    )
    min_overlap: float = Field(description="Tolerance (KIBAN_VARIANT_MIN_OVERLAP) at publish.")
    within_tolerance: bool
    speedup: float = Field(description="ORT img/s of variant ÷ parent, same crops and threads.")
    images_per_second: dict[str, float] = Field(
        default_factory=dict, description="Measured ORT img/s per candidate (and 'parent')."
    )
    threads: int
    machine: str = Field(description="CPU model and cores the speed-up was measured on.")
    warnings: list[str] = Field(default_factory=list)


class GraphFusion(BaseModel):
    """ONNX Runtime transformer optimisations tried at export (ViT-family encoders)."""

    applied: bool = Field(description="True when the stored graph is the fused one.")
    model_type: str
    fusions: dict[str, int] = Field(default_factory=dict, description="Fused operator counts.")
    min_cosine: float | None = Field(None, description="Fused vs unfused graph, parity images.")
    speedup: float | None = Field(None, description="Fused ÷ unfused ORT img/s (same threads).")
    note: str = ""


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
    training: TrainingProvenance | None = Field(
        None, description="Set for a specialist trained by kiban (`kiban train`)."
    )
    variant: VariantInfo | None = Field(
        None, description="Set for a precision variant (`kiban models quantize`)."
    )
    fusion: GraphFusion | None = Field(
        None, description="Transformer graph fusion tried at export (ViT family)."
    )
    exported_at: str
    exporter: dict[str, str] = Field(default_factory=dict, description="Library versions.")
    notes: list[str] = Field(default_factory=list)
