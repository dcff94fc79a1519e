"""The model-export tool: any supported model → one ONNX file with kiban's interface + card.

Cheap to import (no torch): heavy libraries load inside ``export_model``. See
``exporter.export_model`` for the entry point and ``spec.SPEC_FORMS`` for accepted specs.
"""

from kiban_export.errors import ExportError, SpecError
from kiban_export.exporter import export_model
from kiban_export.options import OnnxOptions
from kiban_export.spec import SPEC_FORMS, ExportSpec, parse_spec

__all__ = [
    "SPEC_FORMS",
    "ExportError",
    "ExportSpec",
    "OnnxOptions",
    "SpecError",
    "export_model",
    "parse_spec",
]
