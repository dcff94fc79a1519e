"""Embedded mode runs as a queue: a chunk that always fails is one dead letter, and every
other chunk is still encoded, indexed and evaluated (the distributed twin of this test is
in test_distributed.py and must end the same way)."""

from __future__ import annotations

from pathlib import Path

from kiban.models.registry import publish
from kiban.settings import Settings, use_settings
from kiban.store import open_store
from kiban_cli.synthetic import generate_texture_dataset
from tests.integration.chunk_failure import check_outcome, run_with_failing_chunk


def test_embedded_chunk_failure_leaves_the_rest_of_the_batch(
    tmp_path: Path, exported_models
) -> None:
    images = tmp_path / "images"
    generate_texture_dataset(images, n_classes=4, per_class=12, size=96, groups_per_class=4)
    settings = Settings(home=tmp_path / "home", mode="embedded", chunk_size=12)  # type: ignore[call-arg]
    use_settings(settings)
    store = open_store(settings.resolved_store_uri, create=True)
    for card, path in exported_models.values():
        publish(store, card, path)  # type: ignore[arg-type]
    outcome = run_with_failing_chunk(
        settings, images.as_uri(), (images / "manifest.csv").as_uri(), "fail-embedded"
    )
    check_outcome(outcome)
