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
