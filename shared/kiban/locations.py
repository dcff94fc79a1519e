"""Where a message may send a worker: the one check of every location named in a message.

A queue message is input from whoever can reach the broker. In distributed mode a worker
therefore touches only what the deployment allows:

* ``file://`` locations (sources, manifests, export destinations) only under
  ``KIBAN_ALLOWED_ROOTS``. The path is compared *resolved* (``os.path.realpath``: every
  symbolic link followed, ``..`` applied after), so neither ``..`` nor a link can step out,
  and a root matches whole path components only (``/data2`` is not under ``/data``). No
  roots configured means no ``file://`` location is accepted.
* ``s3://`` locations only in ``KIBAN_ALLOWED_BUCKETS`` when that is set.
* ``synthetic://`` (generated load-test images, ``kiban.synthetic_source``) only as a
  *source*, and only while ``KIBAN_ALLOW_SYNTHETIC_SOURCES`` is true (the default: it
  reads no file and no bucket, so it reaches nothing; an operator may still turn it off).

Anything else raises ``ForbiddenLocationError`` (permanent: the task dead-letters the message
with the reason, no retry). Embedded mode is a person's own command line: not restricted.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from kiban.errors import ForbiddenLocationError
from kiban.settings import Settings
from kiban.store import file_uri_path


def is_under(path: str, root: str) -> bool:
    """Whether resolved ``path`` is ``root`` or inside it (whole components only)."""
    if path == root:
        return True
    return path.startswith(root.rstrip("/") + "/")


def check_location(uri: str, settings: Settings, what: str) -> str:
    """Refuse ``uri`` unless the deployment allows it; return it (``file://`` resolved).

    ``what`` names the location in the error ("source", "manifest", "export destination").
    """
    if settings.mode != "distributed":
        return uri
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if settings.allowed_buckets and parsed.netloc not in settings.allowed_buckets:
            raise ForbiddenLocationError(
                f"{what} {uri}: bucket {parsed.netloc!r} is not in KIBAN_ALLOWED_BUCKETS "
                f"({', '.join(settings.allowed_buckets)})"
            )
        return uri
    if parsed.scheme == "synthetic":
        if what != "source":
            raise ForbiddenLocationError(
                f"{what} {uri}: a synthetic:// location can only be an image source"
            )
        if not settings.allow_synthetic_sources:
            raise ForbiddenLocationError(
                f"{what} {uri}: synthetic sources are turned off (KIBAN_ALLOW_SYNTHETIC_SOURCES)"
            )
        return uri
    if parsed.scheme == "file":
        path = file_uri_path(uri)
    elif not parsed.scheme:
        path = Path(uri)
    else:
        return uri  # not a location kiban opens: open_store refuses it with its own message
    if not path.is_absolute():
        raise ForbiddenLocationError(
            f"{what} {uri}: a relative path is not accepted in a message; "
            "name an absolute file:// location under KIBAN_ALLOWED_ROOTS"
        )
    real = os.path.realpath(path)
    roots = [os.path.realpath(r) for r in settings.allowed_roots if r.strip()]
    if not roots:
        raise ForbiddenLocationError(
            f"{what} {uri}: local paths are not accepted from messages in distributed mode "
            "unless KIBAN_ALLOWED_ROOTS names their directory"
        )
    if not any(is_under(real, root) for root in roots):
        shown = real if real != str(path) else str(path)
        raise ForbiddenLocationError(
            f"{what} {uri}: {shown} is outside KIBAN_ALLOWED_ROOTS ({', '.join(roots)})"
        )
    resolved = Path(real).as_uri()
    return resolved + "/" if uri.endswith("/") and not resolved.endswith("/") else resolved


__all__ = ["check_location", "is_under"]
