"""Each adapter turns its library's "try again later" errors into TransientError, by class."""

from __future__ import annotations

import httpx
import kombu.exceptions
import pytest
import redis.exceptions
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from kiban.errors import KibanError
from kiban.transient import (
    TransientError,
    TranslatingProxy,
    broker_is_transient,
    qdrant_is_transient,
    s3_is_transient,
    translated,
)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ReadTimeoutError(endpoint_url="http://x"), True),
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("AccessDenied", 403), False),
        (KibanError("bad manifest"), False),
        (ValueError("bug"), False),
    ],
)
def test_s3(exc: BaseException, transient: bool) -> None:
    assert s3_is_transient(exc) is transient


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ReadTimeout("slow"), True),
        (ResponseHandlingException(httpx.ConnectError("x")), True),
        (UnexpectedResponse(503, "unavailable", b"", httpx.Headers()), True),
        (UnexpectedResponse(400, "bad request", b"", httpx.Headers()), False),
        (ValueError("dimension mismatch"), False),
    ],
)
def test_qdrant(exc: BaseException, transient: bool) -> None:
    assert qdrant_is_transient(exc) is transient


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (redis.exceptions.ConnectionError("down"), True),
        (redis.exceptions.TimeoutError("slow"), True),
        (redis.exceptions.BusyLoadingError("loading"), True),
        (kombu.exceptions.OperationalError("lost"), True),
        (redis.exceptions.ResponseError("WRONGTYPE"), False),
        (redis.exceptions.AuthenticationError("bad password"), False),
    ],
)
def test_broker(exc: BaseException, transient: bool) -> None:
    assert broker_is_transient(exc) is transient


def test_translated_keeps_the_cause_and_redacts() -> None:
    with pytest.raises(TransientError) as err, translated("broker", broker_is_transient):
        raise redis.exceptions.ConnectionError("redis://:hunter2@host:6379 refused")
    assert isinstance(err.value.__cause__, redis.exceptions.ConnectionError)
    assert "hunter2" not in str(err.value) and "(broker)" in str(err.value)
    with pytest.raises(ValueError), translated("broker", broker_is_transient):
        raise ValueError("not transient: passes through unchanged")


def test_proxy_translates_every_call() -> None:
    class Client:
        size = 3

        def fetch(self) -> None:
            raise httpx.ConnectError("refused")

    proxy = TranslatingProxy(Client(), "Qdrant", qdrant_is_transient)
    assert proxy.size == 3
    with pytest.raises(TransientError, match="ConnectError"):
        proxy.fetch()
