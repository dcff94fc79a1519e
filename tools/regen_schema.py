"""Regenerate the published JSON schema of the report (``make docs``): ``docs/report.schema.json``
from ``kiban_reporter.report.Report`` — sorted keys, indent 2, so a diff shows what changed.
A test fails while the file is stale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiban_reporter.report import Report

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "report.schema.json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema() -> dict[str, Any]:
    """The schema of ``report.json`` as written (field names by alias: ``schema``)."""
    return {"$schema": DIALECT, **Report.model_json_schema(by_alias=True)}


def render() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    SCHEMA_FILE.write_text(render(), encoding="utf-8")


if __name__ == "__main__":
    main()
