"""Lease renewal against a real redis-server and kombu's own Redis channel: a message whose
holder renews is never put back on its queue, however long it is held; one whose holder stopped
renewing is put back after the visibility timeout, and the holder says its lease was lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import kombu
import pytest
import redis

from kiban.liveness import LivenessMonitor, read_heartbeats, renew_interval
from kiban_cli.stack import REDIS_MISSING, Proc, find_redis_server, free_ports, start_redis

pytestmark = pytest.mark.integration

VISIBILITY = 2  # seconds: the test's own patience; the mechanism does not depend on it


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    if find_redis_server() is None:
        pytest.skip(REDIS_MISSING)
    (port,) = free_ports(1)
    proc: Proc = start_redis(tmp_path / "redis", port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


def test_renewed_leases_hold_and_a_dead_holders_message_comes_back(
    broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"visibility_timeout": VISIBILITY}
    client = redis.Redis.from_url(broker)
    queue = kombu.Queue("work", routing_key="work")
    with (
        kombu.Connection(broker, transport_options=options) as holder_conn,
        kombu.Connection(broker, transport_options=options) as sweeper_conn,
    ):
        holder_conn.Producer().publish(
            {"n": 1}, routing_key="work", declare=[queue], headers={"task": "t", "id": "id-1"}
        )
        channel = holder_conn.channel()
        message = channel.basic_get("work", no_ack=False)
        assert message is not None and client.llen("work") == 0
        consumer = SimpleNamespace(task_consumer=SimpleNamespace(channel=channel, queues=[queue]))
        monitor = LivenessMonitor(client, VISIBILITY, "worker-1@test", "127.0.0.1:9")
        monitor.consumer = consumer
        sweeper = sweeper_conn.channel()  # another worker's consumer, sweeping for leases

        # held three visibility timeouts long, renewed: never put back
        deadline = time.monotonic() + 3 * VISIBILITY
        while time.monotonic() < deadline:
            assert monitor.beat()
            sweeper.qos.restore_visible(num=10, interval=1)
            assert client.llen("work") == 0, "a renewed lease was put back on the queue"
            time.sleep(renew_interval(VISIBILITY) / 2)
        (record,) = read_heartbeats(client)
        assert record["node"] == "worker-1@test" and record["held"] == [message.delivery_tag]
        assert record["metrics"] == "127.0.0.1:9"

        # the holder stops renewing (as if SIGKILLed): back on the queue after the timeout
        time.sleep(VISIBILITY + 0.5)
        sweeper.qos.restore_visible(num=10, interval=1)
        assert client.llen("work") == 1
        with caplog.at_level(logging.ERROR, logger="kiban.liveness"):
            assert monitor.beat()
            assert "lost" not in caplog.text  # it might have been acknowledged just then
            assert monitor.beat()
        assert "lease of t[id-1] lost" in caplog.text

        # an acknowledged message is not held any more (kombu keeps it until the next one)
        assert message.delivery_tag in channel.qos._delivered

        channel.basic_ack(message.delivery_tag)  # the ack of a lost lease changes nothing
        assert monitor.held() == {}
        monitor.stop()
        assert read_heartbeats(client) == []
