"""docs/report.schema.json is the published schema of report.json: generated, never stale, and
what the real code writes validates against it."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

import pytest
from report_factory import HOSTILE, build_report

from kiban_reporter.report import REPORT_SCHEMA_VERSION, Report
from tests.conftest import REPO_ROOT

SCHEMA_FILE = REPO_ROOT / "docs" / "report.schema.json"


def _regen() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "regen_schema", REPO_ROOT / "tools/regen_schema.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _published() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return data


def test_published_schema_is_current() -> None:
    regen = _regen()
    assert regen.SCHEMA_FILE == SCHEMA_FILE
    assert SCHEMA_FILE.read_text(encoding="utf-8") == regen.render(), (
        "docs/report.schema.json is stale: run `make docs`"
    )
    schema = _published()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {"schema", "schema_version", "decision", "learning_curves", "trend", "leakage"} <= set(
        schema["properties"]
    )
    assert "per_query" not in schema["$defs"]["RetrievalResult"]["properties"]
    assert regen.render() == regen.render()  # deterministic


def test_written_reports_validate_against_the_published_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = _published()
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    for report in (
        build_report(),
        build_report(labels=HOSTILE, model_names=["a", "b", "c"]),
        build_report(v3=False),
    ):
        data = json.loads(report.to_json())
        assert data["schema_version"] == REPORT_SCHEMA_VERSION
        errors = [e.message for e in validator.iter_errors(data)]
        assert errors == []
        assert Report.model_validate(data).to_json() == report.to_json()
    broken = json.loads(build_report().to_json())
    broken["models"][0]["cost"]["projection"]["volume_images_per_night"] = "many"
    del broken["batch_id"]
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    assert "'batch_id' is a required property" in messages and "'many'" in messages
