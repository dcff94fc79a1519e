"""Broker memory per queued message and per claim, measured on a real redis-server.

``docs/scale.md`` sizes Redis for a ten-million-image night from these two numbers: the
bytes one queued kiban message costs Redis (the Celery envelope around a small JSON
message, sent exactly as the workflow sends it) and the bytes one idempotency claim costs
(``kiban.workflow.claim_once``, a key with a 30-day expiry). Nothing consumes the queue, so
the growth of ``used_memory`` is the messages themselves.

Usage: python bench/bench_broker.py [--messages N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 2_000 if args.quick else args.messages

    import redis

    from kiban.celery_app import configure
    from kiban.messages import EncodeChunk, RunPlan
    from kiban.settings import Settings, use_settings
    from kiban.store import open_store
    from kiban.workflow import claim_once, dispatch
    from kiban_cli.stack import free_ports, start_redis
    from kiban_export.variants import machine

    with tempfile.TemporaryDirectory(prefix="kiban-bench-broker-") as tmp:
        home = Path(tmp)
        (port,) = free_ports(1)
        proc = start_redis(home / "redis", port)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            settings = Settings(home=home, mode="distributed", broker_url=url)
            use_settings(settings)
            configure(settings)
            client = redis.Redis.from_url(url)
            plan = RunPlan(models=["vit-b-32", "effnet-lite0"])
            message = EncodeChunk(
                batch_id="nightly-2026-11-29", model="vit-b-32", chunk=0, plan=plan
            )
            body = len(message.model_dump_json())

            before = int(client.info("memory")["used_memory"])
            for i in range(n):
                dispatch(message.model_copy(update={"chunk": i}), settings)
            queued = int(client.llen("encode"))
            after = int(client.info("memory")["used_memory"])
            per_message = (after - before) / max(1, queued)

            store = open_store((home / "store").as_uri(), create=True)
            before = int(client.info("memory")["used_memory"])
            for i in range(n):
                claim_once(settings, store, f"evaluate-nightly-2026-11-29-{i:016x}")
            after = int(client.info("memory")["used_memory"])
            per_claim = (after - before) / n
        finally:
            proc.stop()

    print(f"CPU: {machine()}; redis-server from kiban_cli.stack.find_redis_server")
    print("| what | measured |")
    print("|---|---|")
    print(f"| EncodeChunk JSON body (2-model plan) | {body} B |")
    print(
        f"| Redis used_memory per queued message ({queued:,} on `encode`) | {per_message:,.0f} B |"
    )
    print(f"| Redis used_memory per claim key ({n:,}) | {per_claim:,.0f} B |")


if __name__ == "__main__":
    main()
