"""The distributed stack for integration tests, shared by the modules that need one.

``running_stack`` starts redis-server and SeaweedFS (``kiban_cli.stack.LocalStack``), the
workers asked for, and points this process's environment at them (boto3 uses the stack's S3
credentials) until the block ends; ``stack_settings`` are the client settings of a stack.
Each test module makes its own module-scoped fixture from these, with the workers it needs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from kiban.settings import Settings, use_settings
from kiban_cli.stack import REDIS_MISSING, LocalStack, find_redis_server


@contextlib.contextmanager
def running_stack(
    home: Path,
    workers: Iterable[tuple[str, str]],
    redis_password: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[LocalStack]:
    """A started stack with ``workers`` (service, name); everything stops at the end."""
    if find_redis_server() is None:
        pytest.skip(REDIS_MISSING)
    stack = LocalStack(home, redis_password=redis_password, extra_env=dict(extra_env or {}))
    stack.start_servers()
    old_env = {k: os.environ.get(k) for k in stack.env}
    os.environ.update(stack.env)  # boto3 in this process uses the stack's S3 credentials
    try:
        for service, name in workers:
            stack.start_worker(service, name)
        yield stack
    finally:
        stack.stop()
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        use_settings(None)


def stack_settings(stack: LocalStack, home: Path) -> Settings:
    """Client settings for ``stack`` (its KIBAN_* environment) with their own home."""
    env = {k[6:].lower(): v for k, v in stack.env.items() if k.startswith("KIBAN_")}
    env["home"] = str(home)
    return Settings(**env)  # type: ignore[arg-type]
