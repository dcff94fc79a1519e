"""Where a batch stands, read from the stores alone: any process can answer it.

Ingested = batch.json exists; encoded = a complete shard (``kiban.shards``) exists;
indexed = the index task's marker exists; failed = a stage gave up on the chunk
(``kiban.progress``); evaluated = a report version exists.

One poisoned record never fails the whole answer: a batch.json, shard meta or dead letter
that does not parse is listed as "unreadable: <reason>" (the reason names the problem, never
the file's content) and the rest is read; markers for chunks outside the batch's plan are
not counted.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from kiban.errors import KibanError
from kiban.progress import failed_chunks, indexed_chunks
from kiban.records import batch_prefix, read_batch_info, report_versions
from kiban.shards import list_shards, meta_key, read_meta
from kiban.store import ObjectStore


def unreadable_reason(exc: BaseException) -> str:
    """Why a stored record could not be read, without quoting what it contains."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        if not errors:
            return "invalid record"
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{where + ': ' if where else ''}{first['msg']}{more}"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, KibanError):  # store errors name the key and the problem
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"cannot be read ({type(exc).__name__})"


class ModelProgress(BaseModel):
    model: str
    chunks: int
    encoded: int
    indexed: int
    failed: int = 0  # chunks dead-lettered for good
    images_encoded: int | None = None  # None: not read (a progress poll)
    encode_failures: int | None = None


class BatchStatus(BaseModel):
    batch_id: str
    ingested: bool
    n_accepted: int = 0
    n_quarantined: int = 0
    n_duplicates: int = 0
    chunks: int = 0
    models: list[ModelProgress] = []
    report_versions: list[str] = []
    dead_letters: int = 0
    unreadable: list[str] = []  # "<key>: <reason>" for each stored record that did not parse

    @property
    def latest_report(self) -> str | None:
        return self.report_versions[-1] if self.report_versions else None


def _count(store: ObjectStore, prefix: str) -> int:
    return sum(1 for _ in store.list(prefix))


def letter_batch(letter: dict[str, Any]) -> str | None:
    """The batch a dead-lettered message was about, when its payload names one."""
    payload = letter.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("kwargs"), dict):
        payload = payload["kwargs"].get("message")  # wrong arguments: the raw call
    batch = payload.get("batch_id") if isinstance(payload, dict) else None
    if not isinstance(batch, str):  # a truncated payload is text: the record names the batch
        batch = letter.get("batch_id")
    return batch if isinstance(batch, str) else None


def read_dead_letter(store: ObjectStore, key: str) -> dict[str, Any]:
    """The stored dead letter, always with ``task`` and ``reason``; one that cannot be read
    or is not a JSON object comes back as ``{"task": <from its key>, "reason": "unreadable:
    …", "unreadable": True}`` (no payload: it names no batch)."""
    parts = key.split("/")
    task = parts[1] if len(parts) > 2 else "?"
    try:
        letter = json.loads(store.get(key))
        reason = None if isinstance(letter, dict) else "a JSON value that is not an object"
    except Exception as exc:
        reason = unreadable_reason(exc)
    if reason is not None:
        return {"task": task, "reason": f"unreadable: {reason}", "unreadable": True, "key": key}
    letter.setdefault("task", task)
    letter.setdefault("reason", "(no reason recorded)")
    return letter


def dead_letter_count(store: ObjectStore, batch_id: str | None = None) -> int:
    if batch_id is None:
        return _count(store, "deadletter")
    return sum(
        1
        for info in store.list("deadletter")
        if letter_batch(read_dead_letter(store, info.key)) == batch_id
    )


def batch_status(
    store: ObjectStore,
    batch_id: str,
    models: list[str] | None = None,
    detailed: bool = True,
) -> BatchStatus:
    """Where the batch stands. ``detailed=False`` only lists keys — no shard metadata or
    dead letter is read — so a progress bar can poll it cheaply on a large batch."""
    info_key = f"{batch_prefix(batch_id)}/batch.json"
    if not store.exists(info_key):
        return BatchStatus(batch_id=batch_id, ingested=False)
    try:
        info = read_batch_info(store, batch_id)
    except Exception as exc:
        return BatchStatus(
            batch_id=batch_id,
            ingested=False,
            report_versions=report_versions(store, batch_id),
            dead_letters=dead_letter_count(store, batch_id) if detailed else 0,
            unreadable=[f"{info_key}: {unreadable_reason(exc)}"],
        )
    if models is None:
        models = sorted({ref.model for ref in list_shards(store) if ref.batch_id == batch_id})
    planned = {c.index for c in info.chunks}
    progress = []
    unreadable: list[str] = []
    for model in models:
        shards = [ref for ref in list_shards(store, model, batch_id) if ref.chunk in planned]
        entry = ModelProgress(
            model=model,
            chunks=len(info.chunks),
            encoded=len(shards),
            indexed=len(indexed_chunks(store, batch_id, model) & planned),
            failed=len(failed_chunks(store, batch_id, model) & planned),
        )
        if detailed:
            entry.images_encoded = entry.encode_failures = 0
            for ref in shards:
                try:
                    meta = read_meta(store, model, batch_id, ref.chunk)
                except Exception as exc:
                    key = meta_key(model, batch_id, ref.chunk)
                    unreadable.append(f"{key}: {unreadable_reason(exc)}")
                    continue
                if meta is not None:
                    entry.images_encoded += meta.n_images
                    entry.encode_failures += len(meta.failures)
        progress.append(entry)
    versions = report_versions(store, batch_id)
    return BatchStatus(
        batch_id=batch_id,
        ingested=True,
        n_accepted=info.n_accepted,
        n_quarantined=info.n_quarantined,
        n_duplicates=info.n_duplicates,
        chunks=len(info.chunks),
        models=progress,
        report_versions=versions,
        dead_letters=dead_letter_count(store, batch_id) if detailed else 0,
        unreadable=unreadable,
    )


def list_batches(store: ObjectStore) -> list[dict[str, object]]:
    """One row per ingested batch, oldest first; a batch whose batch.json cannot be read is
    a row with ``unreadable`` set (its reason) and no counts, listed first."""
    rows: list[dict[str, object]] = []
    for info in store.list("batches"):
        parts = info.key.split("/")
        if len(parts) == 3 and parts[2] == "batch.json":
            row: dict[str, object] = {"batch": parts[1], "unreadable": None}
            try:
                batch = read_batch_info(store, parts[1])
                row.update(
                    created=batch.created_at,
                    accepted=batch.n_accepted,
                    quarantined=batch.n_quarantined,
                    duplicates=batch.n_duplicates,
                )
            except Exception as exc:
                row.update(
                    created=None,
                    accepted=None,
                    quarantined=None,
                    duplicates=None,
                    unreadable=unreadable_reason(exc),
                )
            try:
                row["reports"] = len(report_versions(store, parts[1]))
            except Exception:
                row["reports"] = None
            rows.append(row)
    return sorted(rows, key=lambda r: (r["created"] is not None, str(r["created"])))


def recent_dead_letters(
    store: ObjectStore, limit: int, batch_id: str | None = None
) -> list[dict[str, object]]:
    """The newest dead letters (task, reason), optionally only those naming ``batch_id``."""
    keys = sorted((i.key for i in store.list("deadletter")), key=lambda k: k.rsplit("/", 1)[-1])
    letters = []
    for key in reversed(keys):
        letter = read_dead_letter(store, key)
        if batch_id is not None and letter_batch(letter) != batch_id:
            continue
        letters.append(letter)
        if len(letters) >= limit:
            break
    return letters
