"""Exported models live in the object store so every worker finds them by name.

``models/<name>/model.onnx`` and ``models/<name>/card.json``. Workers keep a local copy
keyed by the file's sha256, so a re-exported model under the same name is never
confused with the old one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kiban.errors import ModelNotFoundError, StoreError
from kiban.messages import is_valid_name
from kiban.models.card import ModelCard
from kiban.store import ObjectStore


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (a model file need not fit in memory twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_key(name: str) -> str:
    return f"models/{name}/model.onnx"


def card_key(name: str) -> str:
    return f"models/{name}/card.json"


def training_set_key(name: str) -> str:
    return f"models/{name}/training-set.json"


def publish_training_set(store: ObjectStore, name: str, sha256s: list[str]) -> None:
    """The sorted sha256s a specialist trained on; written before its card (publish)."""
    store.put(training_set_key(name), json.dumps(sorted(set(sha256s))).encode())


def load_training_set(store: ObjectStore, card: ModelCard) -> frozenset[str]:
    """The images ``card``'s model was trained on (empty for a model kiban did not train)."""
    if card.training is None:
        return frozenset()
    try:
        return frozenset(json.loads(store.get(training_set_key(card.name))))
    except StoreError:
        raise StoreError(
            f"model {card.name!r} was trained by kiban but its training set "
            f"({training_set_key(card.name)}) is missing: leakage cannot be checked"
        ) from None


def publish(store: ObjectStore, card: ModelCard, onnx_path: Path) -> None:
    """Upload the ONNX file, then the card (the card is what makes the model visible)."""
    if not is_valid_name(card.name):
        raise ValueError(f"invalid model name {card.name!r}: use letters, digits, . _ -")
    data = onnx_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.sha256:
        raise ValueError(f"card sha256 {card.sha256} does not match {onnx_path} ({digest})")
    store.put(model_key(card.name), data)
    store.put(card_key(card.name), card.model_dump_json(indent=2).encode())


def load_card(store: ObjectStore, name: str) -> ModelCard:
    try:
        return ModelCard.model_validate_json(store.get(card_key(name)))
    except StoreError:
        known = ", ".join(c.name for c in list_cards(store)) or "none"
        raise ModelNotFoundError(
            f"no model named {name!r} in {store.uri} (known: {known}); "
            "export one with `kiban models export`"
        ) from None


def list_cards(store: ObjectStore) -> list[ModelCard]:
    cards = []
    for info in store.list("models"):
        if info.key.endswith("/card.json"):
            cards.append(ModelCard.model_validate_json(store.get(info.key)))
    return sorted(cards, key=lambda c: c.name)


def fetch_model(store: ObjectStore, card: ModelCard, cache_dir: Path) -> Path:
    """Return a local path to the model's ONNX file, downloading it once per sha256."""
    target = cache_dir / f"{card.name}-{card.sha256[:16]}.onnx"
    if target.is_file():
        return target
    data = store.get(model_key(card.name))
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.sha256:
        raise StoreError(
            f"model {card.name!r}: stored file sha256 {digest} does not match its card "
            f"({card.sha256}); re-export it"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target
