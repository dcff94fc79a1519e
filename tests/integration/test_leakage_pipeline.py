"""The leakage check through the real embedded pipeline: a model kiban "trained" on some of
the batch's images makes the evaluation drop those queries for every model, says so, and
fails clearly when its training set is missing. Also the decision and the measured cost."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiban.errors import KibanError
from kiban.messages import EvaluationProtocol
from kiban.models.card import ModelCard, TrainingProvenance
from kiban.models.registry import publish, publish_training_set, training_set_key
from kiban.pipeline import evaluate_stored, run_batch
from kiban.settings import Settings
from kiban.store import open_store
from kiban.tasks import close_vector_indexes
from kiban_cli.main import app
from kiban_cli.synthetic import generate_texture_dataset

pytestmark = pytest.mark.integration

TRAINED_ON = 6  # images of the batch in the trained model's training set


def _provenance(n: int) -> TrainingProvenance:
    return TrainingProvenance(
        mode="head",
        base_model="effnet-lite0",
        base_source="efficientnet-lite0",
        batches=["an-earlier-night"],
        split="hand-made for the test",
        training_set_sha256="0" * 64,
        n_images=n,
        images_per_class={"x": n},
        objective="none (a copy of the base)",
        epochs=0,
        seed=0,
        loss_per_epoch=[],
        wall_seconds=0.0,
        device="cpu",
    )


def test_trained_on_queries_are_excluded_for_every_model(
    exported_models: dict[str, tuple[object, Path]],
    publish_models,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = tmp_path / "images"
    generate_texture_dataset(images, n_classes=4, per_class=10, size=96, groups_per_class=5)
    files = sorted(p for p in images.rglob("*") if p.suffix in (".jpg", ".png"))
    trained = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files[::7][:TRAINED_ON]]
    assert len(set(trained)) == TRAINED_ON

    home = tmp_path / "home"
    settings = Settings(home=home, chunk_size=16)
    store = open_store(settings.resolved_store_uri, create=True)
    publish_models(store)
    # a "specialist" kiban trained: the base network under a new name with its provenance
    base, path = exported_models["effnet-lite0"]
    assert isinstance(base, ModelCard)
    head = base.model_copy(update={"name": "effnet-head", "training": _provenance(20)})
    publish_training_set(store, "effnet-head", [*trained, *("f" * 63 + str(i) for i in range(14))])
    publish(store, head, path)
    models = ["effnet-head", "vit-s-32-random"]

    report = run_batch(
        settings,
        images.as_uri(),
        models,
        manifest=(images / "manifest.csv").as_uri(),
        batch_id="night-1",
        volume_images_per_night=1_000_000,
    )

    # leave-one-group-out: every image is a query and a candidate
    assert report["protocol"]["name"] == "leave-one-group-out"
    assert report["leakage"] == [
        {
            "model": "effnet-head",
            "training_images": 20,
            "overlap_queries": TRAINED_ON,
            "overlap_candidates": TRAINED_ON,
        }
    ]
    assert report["protocol"]["n_queries"] == 40 - TRAINED_ON
    for section in report["models"]:  # the untrained model loses the same queries
        assert section["retrieval"]["n_queries"] == 40 - TRAINED_ON, section["name"]
    (pair,) = report["comparisons"]
    assert pair["n_queries"] == 40 - TRAINED_ON
    assert (
        f"effnet-head was trained on {TRAINED_ON} of the queries: excluded from the queries of "
        "every model"
    ) in report["warnings"]

    # cost measured on the encoder's hardware, and projected for the stated volume
    for section in report["models"]:
        cost = section["cost"]
        assert cost["devices"] and cost["devices"][0].startswith("cpu")
        assert not cost["mixed_devices"] and cost["cores"] >= 1
        assert cost["p50_batch_seconds"] > 0 and cost["device_seconds_per_1k"] > 0
        assert cost["storage_bytes_per_million"] > 4 * section["embedding_dim"] * 1e6
        projection = cost["projection"]
        assert projection["volume_images_per_night"] == 1_000_000
        assert projection["hours_per_night"] == pytest.approx(
            1_000_000 * cost["seconds_per_1k"] / 1000 / 3600
        )

    # the decision: the report's first line, in the JSON and right under the Markdown title
    decision = report["decision"]
    assert decision is not None and decision["line"]
    assert decision["metric"] == "MV@5 macro-F1"
    assert {p["model"] for p in decision["pareto"]} == set(models)
    assert any("random initialisation" in n for n in decision["notes"])
    md = store.get(f"reports/night-1/{report['version']}/report.md").decode()
    assert md.splitlines()[2] == f"**Decision:** {decision['line']}"
    assert "## Leakage check" in md and "| effnet-head | 20 | 6 | 6 |" in md

    # `kiban report show --volume` recomputes the projection from the stored throughput
    close_vector_indexes()
    monkeypatch.setenv("KIBAN_HOME", str(home))
    result = CliRunner().invoke(
        app, ["report", "show", "night-1", "--volume", "2000000"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert result.output.lstrip().startswith("Decision:")
    assert "2,000,000 images a night" in result.output

    # a trained model whose training set is gone: the evaluation is dead-lettered, by name
    store.delete(training_set_key("effnet-head"))
    with pytest.raises(KibanError, match="effnet-head.*training set"):
        evaluate_stored(settings, "night-1", models, [1, 3, 5], EvaluationProtocol())
    letters = [i.key for i in store.list("deadletter")]
    assert any("evaluate_batch" in k for k in letters)
    last = json.loads(store.get(sorted(letters)[-1]))
    assert "effnet-head" in json.dumps(last)
