"""What a task needs to do its work: settings, the object store, the vector index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiban.settings import Settings, get_settings
from kiban.store import ObjectStore, open_store


@dataclass
class Context:
    settings: Settings
    store: ObjectStore

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Context:
        settings = settings or get_settings()
        store = open_store(
            settings.resolved_store_uri,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            create=True,
        )
        return cls(settings=settings, store=store)

    def open_source(self, uri: str) -> ObjectStore:
        """Open a batch source (read-only use) with the same S3 endpoint settings."""
        return open_store(
            uri,
            self.settings.s3_endpoint_url,
            self.settings.s3_region,
            max_object_bytes=self.settings.max_object_bytes,
        )

    @property
    def cache_dir(self) -> Path:
        return self.settings.home / "cache"
