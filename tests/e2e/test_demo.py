"""`kiban demo` end to end (embedded): the trained head joins the comparison, the report leads
with the decision, the leakage check keeps the head's training images out of the queries, and
the printed HTML report exists and stands alone.

Run with EfficientNet-Lite0 only and a small synthetic set so it fits the default suite; the
full demo (with the 88M-parameter ViT) is what `make demo` runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_trains_a_head_and_leads_with_the_decision(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "KIBAN_HOME": str(home), "KIBAN_PRICE_PER_HOUR": "0.40"}
    proc = subprocess.run(
        [sys.executable, "-m", "kiban_cli.main", "demo", "--per-class", "16"]
        + ["--models", "effnet-lite0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained effnet-lite0-head" in out
    # The summary of the last report starts with the decision, naming one of the two models.
    decision = re.search(r"^Decision: (.*)$", out, re.MULTILINE)
    assert decision is not None, out
    assert re.match(r"(Run effnet-lite0(-head)?:|No clear choice)", decision.group(1))
    html_path = re.search(r"full report: file://(\S+/report\.html)", out)
    assert html_path is not None, out
    page = Path(html_path.group(1)).read_text()
    assert "effnet-lite0-head" in page and "<script" not in page

    report = json.loads(Path(html_path.group(1)).with_name("report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["effnet-lite0", "effnet-lite0-head"]
    assert report["decision"]["line"].startswith(decision.group(1).strip())  # terminal wraps
    (leak,) = report["leakage"]
    assert leak["model"] == "effnet-lite0-head"
    # every training image that was a query was excluded; what is left are held-out images
    assert leak["overlap_queries"] > 0
    assert report["protocol"]["n_queries"] + leak["overlap_queries"] <= 96
    assert report["protocol"]["n_queries"] > 0
    assert len(report["comparisons"]) == 1 and report["learning_curves"] is not None
