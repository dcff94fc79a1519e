"""kiban ingest service."""
