"""kiban encoder service."""
