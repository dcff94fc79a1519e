"""Parse the export SPEC string into a typed object.

Parsing is pure string work plus "does this file exist" checks, so a typo fails in
milliseconds with a clear message instead of after torch has been imported. Whether an
architecture name exists is checked later by the builder, which has the library loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kiban_export.errors import SpecError

Source = Literal["efficientnet-lite0", "open_clip", "torchvision", "timm", "onnx"]

SPEC_FORMS = (
    "efficientnet-lite0",
    "open_clip:ARCH[:PRETRAINED_TAG|CHECKPOINT_FILE]",
    "open_clip:hf-hub:ORG/REPO",
    "torchvision:NAME[:WEIGHTS_FILE]",
    "timm:NAME[:WEIGHTS_FILE]",
    "onnx:PATH",
)
_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz", ".onnx")
_HUB_SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass(frozen=True)
class ExportSpec:
    """A parsed SPEC.

    ``arch`` is the architecture (or model) name handed to the library; ``weights`` is
    what the third part said (tag, hub name or file), ``weights_file`` is set only when
    it is a local file that exists.
    """

    raw: str
    source: Source
    arch: str
    weights: str | None = None
    weights_file: Path | None = None

    @property
    def random_init(self) -> bool:
        """True when nothing but the architecture is given (open_clip/timm/torchvision)."""
        return self.source != "efficientnet-lite0" and self.source != "onnx" and not self.weights


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or "\\" in text
        or text.startswith(("~", "."))
        or text.lower().endswith(_PATH_SUFFIXES)
    )


def _existing_file(text: str, what: str, spec: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise SpecError(f"{what} {text!r} in spec {spec!r} does not exist")
    if not path.is_file():
        raise SpecError(f"{what} {text!r} in spec {spec!r} is not a file")
    return path.resolve()


def _bad(spec: str, why: str) -> SpecError:
    forms = "; ".join(SPEC_FORMS)
    return SpecError(f"invalid export spec {spec!r}: {why}. Accepted forms: {forms}")


def parse_spec(spec: str) -> ExportSpec:
    """Parse ``spec``; raise SpecError naming the accepted forms when it is malformed."""
    text = spec.strip()
    if not text:
        raise _bad(spec, "it is empty")
    if text == "efficientnet-lite0":
        return ExportSpec(raw=text, source="efficientnet-lite0", arch="efficientnet-lite0")
    prefix, sep, rest = text.partition(":")
    if not sep:
        raise _bad(spec, f"no source prefix (unknown model {text!r})")
    if prefix == "onnx":
        if not rest:
            raise _bad(spec, "onnx: needs a file path")
        path = _existing_file(rest, "ONNX file", spec)
        return ExportSpec(raw=text, source="onnx", arch=path.stem, weights_file=path)
    if prefix == "open_clip":
        return _parse_open_clip(text, rest)
    if prefix in ("torchvision", "timm"):
        return _parse_local_weights(text, prefix, rest)
    known = ", ".join(["efficientnet-lite0", "open_clip:", "torchvision:", "timm:", "onnx:"])
    raise _bad(spec, f"unknown source {prefix!r} (known: {known})")


def _parse_open_clip(text: str, rest: str) -> ExportSpec:
    if rest.startswith(_HUB_SCHEMAS):
        # open_clip:hf-hub:org/repo — the hub name is the model name (config + weights).
        if rest.endswith(":") or rest.partition(":")[2] == "":
            raise _bad(text, "hub name is empty")
        return ExportSpec(raw=text, source="open_clip", arch=rest, weights=rest)
    arch, sep, weights = rest.partition(":")
    if not arch:
        raise _bad(text, "open_clip: needs an architecture, e.g. open_clip:ViT-B-32")
    if sep and not weights:
        raise _bad(text, "empty pretrained tag/checkpoint after the architecture")
    if not weights:
        return ExportSpec(raw=text, source="open_clip", arch=arch)
    if weights.startswith(_HUB_SCHEMAS):
        # open_clip:ViT-B-32:hf-hub:org/repo — the hub repo carries its own config.
        return ExportSpec(raw=text, source="open_clip", arch=weights, weights=weights)
    candidate = Path(weights).expanduser()
    if candidate.is_file() or _looks_like_path(weights):
        path = _existing_file(weights, "checkpoint file", text)
        return ExportSpec(
            raw=text, source="open_clip", arch=arch, weights=str(path), weights_file=path
        )
    return ExportSpec(raw=text, source="open_clip", arch=arch, weights=weights)


def _parse_local_weights(
    text: str, prefix: Literal["torchvision", "timm"], rest: str
) -> ExportSpec:
    name, sep, weights = rest.partition(":")
    if not name:
        raise _bad(text, f"{prefix}: needs a model name, e.g. {prefix}:resnet18")
    if sep and not weights:
        raise _bad(text, "empty weights file after the model name")
    if not weights:
        return ExportSpec(raw=text, source=prefix, arch=name)
    path = _existing_file(weights, "weights file", text)
    return ExportSpec(raw=text, source=prefix, arch=name, weights=str(path), weights_file=path)
