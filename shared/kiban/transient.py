"""One error for "try again later", raised at the boundary of each outside service.

The object store, the vector index and the broker each translate their library's
errors here: an unreachable, overloaded or restarting server becomes ``TransientError``
(which Celery retries with backoff, see ``kiban.tasks``); anything else passes through
unchanged and fails the task for good. Classification uses the libraries' exception
classes, never names matched as strings.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

from kiban.errors import KibanError
from kiban.telemetry import redact

Classifier = Callable[[BaseException], bool]


class TransientError(KibanError):
    """The other side is unreachable, overloaded or restarting: retry the task later."""

    @classmethod
    def from_cause(cls, service: str, cause: BaseException) -> TransientError:
        """The message names the cause and the service, with credentials redacted.

        (One string argument, so Celery can pickle the exception like any other.)"""
        return cls(f"{type(cause).__name__}: {redact(str(cause))[:300]} ({service})")


def _network(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError, socket.timeout))


_S3_RETRY_CODES = {
    "SlowDown",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "Throttling",
}


def s3_is_transient(exc: BaseException) -> bool:
    """botocore: connection and read failures, 5xx and throttling answers."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if _network(exc) or isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return int(status or 0) >= 500 or code in _S3_RETRY_CODES
    return False


def qdrant_is_transient(exc: BaseException) -> bool:
    """qdrant-client over HTTP (httpx) or gRPC: unreachable, timed out, or 5xx."""
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if _network(exc) or isinstance(exc, (httpx.TransportError, ResponseHandlingException)):
        return True
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and exc.status_code >= 500
    try:
        import grpc
    except ImportError:  # pragma: no cover - grpc ships with qdrant-client
        return False
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


def broker_is_transient(exc: BaseException) -> bool:
    """Redis (redis-py) and the Celery transport (kombu): connection lost or loading.

    A refused password is a configuration error, not an outage (redis-py makes it a
    ConnectionError subclass)."""
    import kombu.exceptions
    import redis.exceptions

    if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)):
        return False
    return _network(exc) or isinstance(
        exc,
        (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
            kombu.exceptions.OperationalError,
        ),
    )


@contextlib.contextmanager
def translated(service: str, is_transient: Classifier) -> Iterator[None]:
    """Re-raise ``is_transient`` errors of ``service`` as TransientError (cause kept)."""
    try:
        yield
    except TransientError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise TransientError.from_cause(service, exc) from exc
        raise


class TranslatingProxy:
    """Wraps a client object so that every method call goes through ``translated``."""

    def __init__(self, target: Any, service: str, is_transient: Classifier) -> None:
        self._target, self._service, self._is_transient = target, service, is_transient

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with translated(self._service, self._is_transient):
                return attr(*args, **kwargs)

        return call
