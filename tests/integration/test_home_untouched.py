"""Nothing is written outside the store (issue 9 §7b): a real embedded batch — ingest, ONNX
Runtime encoding, Qdrant local mode, the evaluation with its HTML figures — run as the
`kiban` command with ``HOME`` and ``TMPDIR`` pointed at empty directories, and ``KIBAN_HOME``
elsewhere, leaves both directories empty. ONNX Runtime's telemetry is switched off where the
sessions are created (``kiban_encoder.session``, ``kiban_export.parity``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiban.store import open_store
from kiban_cli.synthetic import generate_texture_dataset

pytestmark = pytest.mark.integration

KIBAN = Path(sys.executable).parent / "kiban"

# Variables that would send a library's cache or config somewhere other than $HOME: unset,
# so that a write to the home directory shows up here.
REDIRECTS = (
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
    "MPLCONFIGDIR",
    "NUMBA_CACHE_DIR",
    "TORCH_HOME",
    "HF_HOME",
    "PYTHONPYCACHEPREFIX",
)


def everything_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.timeout(600)
def test_embedded_run_writes_nothing_to_home_or_tmp(tmp_path: Path, publish_models) -> None:  # type: ignore[no-untyped-def]
    home, tmp, kiban_home = tmp_path / "home", tmp_path / "tmp", tmp_path / "kiban-home"
    home.mkdir()
    tmp.mkdir()
    store = open_store((kiban_home / "store").resolve().as_uri(), create=True)
    model = publish_models(store)[0]
    source = tmp_path / "images"
    generate_texture_dataset(source, n_classes=3, per_class=4, size=64, seed=2)

    env = {k: v for k, v in os.environ.items() if not k.startswith("KIBAN_")}
    for name in REDIRECTS:
        env.pop(name, None)
    env.update(HOME=str(home), TMPDIR=str(tmp), KIBAN_HOME=str(kiban_home), KIBAN_CHUNK_SIZE="5")
    done = subprocess.run(
        [
            str(KIBAN),
            "run",
            "--source",
            source.as_uri(),
            "--manifest",
            "manifest.csv",
            "--models",
            model,
            "--batch",
            "home-check",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Decision:" in done.stdout
    assert everything_under(home) == [], everything_under(home)
    assert everything_under(tmp) == [], everything_under(tmp)
    assert store.exists("reports/home-check/0001/report.json")
    html = store.get("reports/home-check/0001/report.html")
    assert b"<svg" in html  # the figures were drawn (matplotlib ran) — and left HOME alone
