"""kiban reporter service."""
