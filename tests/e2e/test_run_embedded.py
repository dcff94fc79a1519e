"""`kiban run` end to end on the embedded default: real images, real ONNX models, Qdrant
local mode, the Celery tasks run in-process — and the same command's output checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kiban.records import read_batch_info, read_chunk_records, read_quarantine, read_records
from kiban.settings import load_settings
from kiban.store import open_store
from kiban.tasks import close_vector_indexes
from kiban.vectors import VectorIndex
from kiban_cli.main import app
from kiban_cli.synthetic import generate_texture_dataset, problem_files

runner = CliRunner()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """6 classes x 12 synthetic textures in 6 lots each, plus planted problem files."""
    root = tmp_path / "images"
    generate_texture_dataset(root, per_class=12, size=96, groups_per_class=6)
    (root / "manifest.csv").unlink()  # labels from folders in this test
    for problem in problem_files():
        (root / "checker" / f"zz-{problem.name}").write_bytes(problem.data)
    return root


def _kiban(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _count_points(model: str, batch: str) -> int:
    close_vector_indexes()  # the CLI's client holds the local Qdrant lock
    index = VectorIndex(load_settings())
    try:
        return index.count(model, batch)
    finally:
        index.close()


def test_run_reports_quarantines_and_is_idempotent(
    dataset: Path, publish_models, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KIBAN_MAX_IMAGE_PIXELS", "1000000")  # makes the 4000x4000 PNG a bomb
    monkeypatch.setenv("KIBAN_CHUNK_SIZE", "32")
    settings = load_settings()
    store = open_store(settings.resolved_store_uri, create=True)
    models = publish_models(store)

    code, out = _kiban(
        "run", "--source", dataset.as_uri(), "--models", ",".join(models), "--batch", "b1"
    )
    assert code == 0, out
    assert "MV@5 macro-F1" in out and "effnet-lite0" in out

    records = read_records(store, "b1")
    info = read_batch_info(store, "b1")
    assert len(info.chunks) == 3  # 74 records in chunks of 32
    chunked = [r for c in info.chunks for r in read_chunk_records(store, "b1", c.index)]
    assert chunked == records  # each task reads only its own chunk's file
    quarantine = {q.key: q.reason for q in read_quarantine(store, "b1")}
    planted = {f"checker/zz-{p.name}": p.expect for p in problem_files()}
    for key, expect in planted.items():
        if expect is None:
            assert key in {r.key for r in records} or any(key in r.duplicates for r in records)
        else:
            assert quarantine[key].startswith(expect), (key, quarantine[key])
    n_valid = 72 + sum(1 for e in planted.values() if e is None) - 1  # one exact duplicate
    assert len(records) == n_valid

    version = json.loads(store.get("reports/b1/0001/report.json"))
    assert version["schema"] == "kiban.report" and version["protocol"]["name"] == "leave-one-out"
    by_model = {m["name"]: m for m in version["models"]}
    assert set(by_model) == set(models)
    for m in by_model.values():
        assert m["images_encoded"] == n_valid
        at5 = next(x for x in m["retrieval"]["metrics"] if x["k"] == 5)
        assert 0.0 <= at5["mv_accuracy"]["value"] <= 1.0
        assert at5["mv_accuracy"]["ci_low"] <= at5["mv_accuracy"]["value"]
        assert m["cost"]["encode_images_per_second"] > 0
        assert m["cost"]["provider"] == "CPUExecutionProvider"
    # the ImageNet CNN separates these textures far better than an untrained ViT
    f1 = {
        name: next(x for x in m["retrieval"]["metrics"] if x["k"] == 5)["mv_macro_f1"]["value"]
        for name, m in by_model.items()
    }
    assert f1["effnet-lite0"] > 0.7 > f1["vit-s-32-random"]
    assert len(version["verdicts"]) == 1
    assert any("random initialisation" in w for w in version["warnings"])
    assert "## Quarantine" in store.get("reports/b1/0001/report.md").decode()

    for model in models:
        assert _count_points(model, "b1") == n_valid

    # Same trigger again: nothing new is encoded, no point is added, the report is reused.
    code, out = _kiban(
        "run", "--source", dataset.as_uri(), "--models", ",".join(models), "--batch", "b1"
    )
    assert code == 0, out
    for model in models:
        assert _count_points(model, "b1") == n_valid
    assert not store.exists("reports/b1/0002/report.json")

    # Embeddings can be checked outside kiban.
    out_file = tmp_path / "e.npz"
    code, out = _kiban(
        "embeddings", "export", "--batch", "b1", "--model", "effnet-lite0", "--out", str(out_file)
    )
    assert code == 0, out
    data = np.load(out_file)
    assert data["vectors"].shape == (n_valid, 1280)
    assert np.allclose(np.linalg.norm(data["vectors"], axis=1), 1.0, atol=1e-5)
    assert set(data["labels"]) == {
        "checker",
        "rings",
        "scratches",
        "spots",
        "stripes_coarse",
        "stripes_fine",
    }
    assert len(set(data["ids"])) == n_valid

    code, out = _kiban("report", "show", "b1")
    assert code == 0 and "b1" in out


def test_unknown_model_and_bad_setting_fail_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "KIBAN_HOME": str(tmp_path / "h")}
    exe = [sys.executable, "-m", "kiban_cli.main"]
    proc = subprocess.run(
        [*exe, "run", "--source", tmp_path.as_uri(), "--models", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no model named 'nope'" in proc.stderr and "Traceback" not in proc.stderr

    proc = subprocess.run(
        [*exe, "models", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "KIBAN_BATCH_SIZE": "zero"},
    )
    assert proc.returncode == 2
    assert "KIBAN_BATCH_SIZE" in proc.stderr


def test_every_command_has_help() -> None:
    for args in (
        [],
        ["run"],
        ["models"],
        ["models", "export"],
        ["models", "list"],
        ["report", "show"],
        ["embeddings", "export"],
        ["demo"],
        ["settings"],
    ):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.output


def test_models_export_list_show_through_the_cli() -> None:
    code, out = _kiban("models", "export", "efficientnet-lite0", "--name", "e0")
    assert code == 0, out
    assert "published e0" in out and "parity min cosine 1.0000" in out
    code, out = _kiban("models", "list")
    assert code == 0 and "e0" in out and "efficientnet-lite0" in out
    code, out = _kiban("models", "show", "e0")
    assert code == 0 and '"embedding_dim": 1280' in out
    code, out = _kiban("models", "export", "onnx:/nowhere.onnx", "--name", "x")
    assert code == 2  # bring-your-own ONNX needs its input size and normalisation
    code, out = _kiban("models", "show", "nope")
    assert code == 2
