"""Exceptions with messages meant for the person at the terminal, not for a debugger."""


class KibanError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""


class ConfigurationError(KibanError):
    """A setting is missing or invalid; the message names the setting."""


class StoreError(KibanError):
    """An object-store key is missing, unreadable or outside the configured prefix."""


class ModelNotFoundError(KibanError):
    """No exported model of that name exists in the registry."""


class InvalidMessageError(KibanError):
    """A queue message failed validation; it is dead-lettered with this reason."""


class ObjectRefusedError(StoreError):
    """An object kiban will not read: not a regular file, a link out of its prefix, too large.

    ``reason`` is the short, content-free statement ingest puts in the quarantine.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)  # one argument: Celery can pickle it like any other
        self.reason = reason or message


class ObjectTooLargeError(ObjectRefusedError):
    """An object is larger than ``KIBAN_MAX_OBJECT_BYTES``; found while streaming, not after."""


class ForbiddenLocationError(KibanError):
    """A message names a place the deployment does not allow (``KIBAN_ALLOWED_ROOTS`` /
    ``KIBAN_ALLOWED_BUCKETS``): permanent, dead-lettered at once, never retried."""
