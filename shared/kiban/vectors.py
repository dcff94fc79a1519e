"""The vector store: one Qdrant collection per model, deterministic point IDs.

Point ID = uuid5(sha256 of the image bytes + model name), so indexing the same image
twice for the same model is one point. Qdrant local mode (a directory, the embedded
default) allows a single process per path; production passes a server URL. Every
client call goes through ``kiban.transient``: an unreachable or failing server is a
``TransientError``.

Local mode persists every point in its own SQLite transaction (qdrant-client's
``CollectionPersistence.persist`` commits once per point): 0.4-0.6 ms CPU per point on
AMD EPYC, 2 shared cores, more than the rest of the upsert (0.25 ms). ``VectorIndex.upsert``
holds back those per-point commits and commits the shard once (``_one_commit``), so a shard
is on disk all or nothing when ``upsert`` returns. That reaches into qdrant-client's local
internals; ``tests/unit/kiban/test_vectors_local.py`` fails if they change, and if they are
not as expected at run time the per-point commits are kept (slower, still correct).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from kiban.settings import Settings
from kiban.transient import TranslatingProxy, qdrant_is_transient

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("6f1c1c1e-8a0b-4c59-9d3c-6b6962616e00")


def point_id(sha256: str, model: str) -> str:
    """Same image + same model → same point, in every run and on every worker."""
    return str(uuid.uuid5(_NAMESPACE, f"{model}:{sha256}"))


def collection_name(model: str) -> str:
    return f"kiban-{model}"


def _qdrant_client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qdrant-client")
    except PackageNotFoundError:
        return "?"


class _DeferredCommit:
    """Stands in for a local collection's SQLite connection while kiban upserts a shard.

    qdrant-client writes each point inside ``with connection:``, which commits on leaving
    the block; here leaving the block does nothing, so every point of the shard joins one
    transaction that ``VectorIndex._one_commit`` commits (or rolls back) once. Everything
    else (``execute``, ...) goes to the real connection.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def __enter__(self) -> _DeferredCommit:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        return False  # neither commit nor roll back here; an exception still propagates


class VectorIndex:
    """A thin layer over qdrant-client with the few operations kiban needs."""

    def __init__(self, settings: Settings) -> None:
        from qdrant_client import QdrantClient

        self.settings = settings
        self._write_lock = threading.Lock()  # one shard transaction at a time (local mode)
        self._warned_per_point = False
        if settings.qdrant_url:
            api_key = (
                settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
            )
            client = QdrantClient(url=settings.qdrant_url, api_key=api_key, timeout=60)
            self.location = settings.qdrant_url
        else:
            path = settings.resolved_qdrant_path
            path.mkdir(parents=True, exist_ok=True)
            client = QdrantClient(path=str(path))
            self.location = str(path)
        self._qdrant: Any = client
        self.client: Any = TranslatingProxy(client, "Qdrant", qdrant_is_transient)

    def _reopen_local(self) -> None:
        """Reload a local collection from disk: after a rolled-back shard, memory held
        points the file does not."""
        from qdrant_client import QdrantClient

        self._qdrant.close()
        self._qdrant = QdrantClient(path=self.location)
        self.client = TranslatingProxy(self._qdrant, "Qdrant", qdrant_is_transient)

    def _local_persistence(self, name: str) -> Any | None:
        """qdrant-client's ``CollectionPersistence`` of a local collection, or None when the
        collection does not exist (qdrant-client then raises its own error) or its internals
        are not the ones ``_one_commit`` was written for (see the module doc)."""
        collections = getattr(getattr(self._qdrant, "_client", None), "collections", None)
        if isinstance(collections, dict) and name not in collections:
            return None
        persistence = getattr((collections or {}).get(name), "storage", None)
        if isinstance(getattr(persistence, "storage", None), sqlite3.Connection):
            return persistence
        if not self._warned_per_point:
            self._warned_per_point = True
            log.warning(
                "qdrant-client %s local mode: no SQLite connection found for collection %s; "
                "indexing commits once per point (slower)",
                _qdrant_client_version(),
                name,
            )
        return None

    @contextlib.contextmanager
    def _one_commit(self, name: str) -> Iterator[None]:
        """Local mode: every point written inside this block is committed once at its end.

        Durability is unchanged at the end: when the block exits normally the shard is
        committed (SQLite's default synchronous=FULL). On an error the transaction is rolled
        back and the collection reloaded from disk, so memory and file agree and a retry
        re-upserts the whole shard; a crash mid-shard leaves the file as before the shard.
        Server mode: nothing to do.
        """
        if not self.is_local:
            yield
            return
        with self._write_lock:
            persistence = self._local_persistence(name)
            if persistence is None:
                yield
                return
            connection = persistence.storage
            persistence.storage = _DeferredCommit(connection)
            try:
                yield
                persistence.storage = connection
                connection.commit()
            except BaseException as exc:
                persistence.storage = connection
                connection.rollback()
                if isinstance(exc, Exception):
                    self._reopen_local()
                raise

    def close(self) -> None:
        self.client.close()

    def ensure_collection(self, model: str, dim: int) -> None:
        from qdrant_client import models

        name = collection_name(model)
        if self.client.collection_exists(name):
            info = self.client.get_collection(name)
            params = info.config.params.vectors
            size = getattr(params, "size", None)
            if size is not None and size != dim:
                raise ValueError(
                    f"collection {name} has dimension {size}, model {model} produces {dim}; "
                    "a model name must not be reused for a different architecture"
                )
            return
        self.client.create_collection(
            name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
        )
        if self.is_local:
            return  # local mode ignores payload indexes (and warns); a server uses them
        for field in ("batch", "label", "sha256"):
            self.client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD)

    def upsert(
        self,
        model: str,
        sha256s: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        batch_size: int = 256,
    ) -> int:
        """Write the points (idempotent: same image + model → same point); returns how many.

        Local mode: the whole call is one SQLite transaction, on disk when this returns and
        absent after an error or crash, so a retried shard is re-upserted whole.
        """
        from qdrant_client import models

        name = collection_name(model)
        with self._one_commit(name):  # local mode: one SQLite commit for the whole call
            for start in range(0, len(sha256s), batch_size):
                stop = start + batch_size
                points = [
                    models.PointStruct(
                        id=point_id(sha, model), vector=vec.tolist(), payload=payload
                    )
                    for sha, vec, payload in zip(
                        sha256s[start:stop], vectors[start:stop], payloads[start:stop], strict=True
                    )
                ]
                self.client.upsert(name, points=points, wait=True)
        return len(sha256s)

    def count(self, model: str, batch_id: str | None = None) -> int:
        from qdrant_client import models

        name = collection_name(model)
        if not self.client.collection_exists(name):
            return 0
        flt = None
        if batch_id is not None:
            flt = models.Filter(
                must=[models.FieldCondition(key="batch", match=models.MatchValue(value=batch_id))]
            )
        return int(self.client.count(name, count_filter=flt, exact=True).count)

    def search(self, model: str, vector: np.ndarray, limit: int) -> list[tuple[str, float]]:
        """Top ``limit`` (sha256, score) pairs from the served index."""
        res = self.client.query_points(
            collection_name(model), query=vector.tolist(), limit=limit, with_payload=["sha256"]
        )
        return [(str((p.payload or {}).get("sha256")), float(p.score)) for p in res.points]

    # --- read side used by the reporter's ANN check -------------------------------------

    @property
    def is_local(self) -> bool:
        """Qdrant local mode (a directory): exact brute-force search, no HNSW."""
        return not self.settings.qdrant_url

    def collection_settings(self, model: str) -> dict[str, Any] | None:
        """The model collection's size and index settings, or None when it does not exist."""
        name = collection_name(model)
        if not self.client.collection_exists(name):
            return None
        info = self.client.get_collection(name)
        params = info.config.params.vectors
        distance = getattr(params, "distance", None)
        hnsw = info.config.hnsw_config
        out: dict[str, Any] = {
            "collection": name,
            "mode": "local" if self.is_local else "server",
            "points_count": info.points_count,
            "indexed_vectors_count": info.indexed_vectors_count,
            "distance": getattr(distance, "value", None if distance is None else str(distance)),
            "dim": getattr(params, "size", None),
        }
        if self.is_local:
            out["index"] = "local mode: exact brute force (HNSW settings unused)"
            out["hnsw_m"] = out["hnsw_ef_construct"] = out["full_scan_threshold"] = None
            out["quantization"] = None
        else:
            out["index"] = "hnsw"
            out["hnsw_m"] = hnsw.m
            out["hnsw_ef_construct"] = hnsw.ef_construct
            out["full_scan_threshold"] = hnsw.full_scan_threshold
            quant = info.config.quantization_config
            out["quantization"] = None if quant is None else type(quant).__name__
        return out

    def payload_batches(
        self, model: str, sha256s: Sequence[str], chunk: int = 1000
    ) -> dict[str, str | None]:
        """sha256 → the ``batch`` payload of its point, for the images that are indexed."""
        name = collection_name(model)
        out: dict[str, str | None] = {}
        for start in range(0, len(sha256s), chunk):
            part = list(sha256s[start : start + chunk])
            ids = [point_id(sha, model) for sha in part]
            by_id = dict(zip(ids, part, strict=True))
            for rec in self.client.retrieve(name, ids=ids, with_payload=["batch"]):
                batch = (rec.payload or {}).get("batch")
                out[by_id[str(rec.id)]] = None if batch is None else str(batch)
        return out

    def search_filtered(
        self, model: str, vector: np.ndarray, limit: int, batches: Sequence[str] | None = None
    ) -> list[tuple[str, float]]:
        """Top ``limit`` (sha256, score) pairs, optionally only among points of ``batches``."""
        from qdrant_client import models

        flt = None
        if batches is not None:
            flt = models.Filter(
                must=[models.FieldCondition(key="batch", match=models.MatchAny(any=list(batches)))]
            )
        res = self.client.query_points(
            collection_name(model),
            query=vector.tolist(),
            limit=limit,
            query_filter=flt,
            with_payload=["sha256"],
        )
        return [(str((p.payload or {}).get("sha256")), float(p.score)) for p in res.points]
