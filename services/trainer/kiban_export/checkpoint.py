"""Loading weight files into a module, tolerant only where it is safe to be.

Checkpoints from training scripts wrap the state dict (``state_dict``/``model`` keys),
carry ``module.`` prefixes from DataParallel, and include a classifier head the embedding
model does not have. Those differences are tolerated and reported; any other missing or
unexpected key is an error, because silently half-loaded weights give plausible-looking
but wrong embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiban_export.errors import ExportError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "net")
_STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class LoadReport:
    """What happened while loading: shown in the model card's notes."""

    stripped_prefixes: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    missing_head_keys: list[str] = field(default_factory=list)

    def notes(self, path: Path) -> list[str]:
        out = [f"weights loaded from {path}"]
        if self.stripped_prefixes:
            out.append("stripped key prefix(es): " + ", ".join(self.stripped_prefixes))
        if self.ignored_keys:
            out.append(
                f"ignored {len(self.ignored_keys)} classifier key(s) not used by the embedding: "
                + ", ".join(sorted(self.ignored_keys))
            )
        if self.missing_head_keys:
            out.append(
                "checkpoint has no classifier keys (not needed): "
                + ", ".join(sorted(self.missing_head_keys))
            )
        return out


def read_state_dict(path: Path) -> dict[str, Any]:
    """Read a .safetensors or torch-saved file and return a flat name→tensor dict."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        raise ExportError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ExportError(f"weights file {path} does not contain a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ExportError(f"weights file {path} has non-tensor entries: {bad[:5]}")
    return obj


def _strip_prefixes(state: dict[str, Any], expected: set[str], report: LoadReport) -> dict:
    """Remove wrapper prefixes present on every key (only if that makes keys match better)."""
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix) :]: v for k, v in state.items()}
                if len(expected & stripped.keys()) >= len(expected & state.keys()):
                    state = stripped
                    report.stripped_prefixes.append(prefix)
                    changed = True
    return state


def apply_state_dict(
    module: Any, state: dict[str, Any], head_prefixes: tuple[str, ...], path: Path
) -> LoadReport:
    """Load ``state`` into ``module`` strictly, except keys under ``head_prefixes``.

    ``module`` is the embedding module whose classifier was already removed, so head keys
    in the checkpoint are ignored and head keys missing from it are fine.
    """
    report = LoadReport()
    expected = set(module.state_dict().keys())
    state = _strip_prefixes(dict(state), expected, report)

    def is_head(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in head_prefixes)

    report.ignored_keys = [k for k in state if is_head(k) and k not in expected]
    state = {k: v for k, v in state.items() if k not in report.ignored_keys}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    report.missing_head_keys = [k for k in missing if is_head(k)]
    missing = [k for k in missing if not is_head(k)]
    if missing or unexpected:
        raise ExportError(
            f"weights file {path} does not match the architecture: "
            f"{len(missing)} missing key(s) {missing[:8]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:8]}"
        )
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(module.state_dict()[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(module.state_dict()[k].shape)
    ]
    if shape_errors:
        raise ExportError(f"weights file {path} has wrong shapes: {shape_errors[:5]}")
    module.load_state_dict(state, strict=not report.missing_head_keys)
    return report
