"""The alerts and the dashboard against a real Prometheus scraping a real stack.

redis-server, SeaweedFS and real worker processes (ingest, two encoders on this one host,
the indexer — which also serves the report queue, Qdrant local mode having a single writer —
and the queue exporter), each with its own metrics port, scraped every second by the Debian
``prometheus`` binary with ``evaluation_interval: 1s``. The rules are the shipped
``charts/kiban/files/alerts.yaml`` with the time scaled down (``scaled_rules``: every
``for:`` becomes 3 s, the range windows and offsets become seconds, the exporter's
staleness threshold 15 s); the expressions are otherwise the shipped ones.

1. A normal run (two batches of series ``lot-``): every dashboard panel's expression
   (charts/kiban/dashboards/kiban.json, Grafana variables filled in) returns data, no alert
   fires, and the two encoders answer a Celery ping as two nodes.
2. Then each alert's situation, asserted as ``ALERTS{alertname=..., alertstate="firing"}``:
   a batch with shuffled labels (KibanQualityRegression); the ingest worker's first dead
   letter (KibanDeadLettersIncreasing, KibanTaskFailureRate); a failed evaluation, which
   must not count as the nightly run; both encoders SIGKILLed while a batch's chunks wait
   (KibanQueueWithoutWorkers, KibanBatchStalled, KibanEncodeStalled); no successful
   evaluation for the scaled 26 h (KibanNoNightlyRun); the exporter killed
   (KibanQueueExporterDown).

Skipped, saying why, without the ``prometheus`` binary (``apt-get install -y prometheus``;
CI installs it) or redis-server. The queue exporter's reading of Celery's priority
sub-queues is checked against a real redis-server without Prometheus.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiban.celery_app import app, configure
from kiban.errors import KibanError
from kiban.exporter import QueueSampler, watched_queues
from kiban.messages import IngestBatch, RunPlan
from kiban.pipeline import run_batch
from kiban.settings import Settings, use_settings
from kiban.store import open_store
from kiban.workflow import dispatch
from kiban_cli.stack import LocalStack, free_ports, start_redis, wait_until
from kiban_cli.synthetic import generate_texture_dataset
from tests.integration.stack_fixtures import running_stack, stack_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "charts/kiban/files/alerts.yaml"
DASHBOARD = REPO / "charts/kiban/dashboards/kiban.json"
MODEL = "effnet-lite0"

# The shipped durations and what they become here. An alert with a duration not listed
# fails the test: a new alert must say how it is scaled.
WINDOWS = {"15m": "15s", "30m": "20s", "1h": "15s", "26h": "45s"}
FOR_SCALED = "3s"
THRESHOLDS = {
    # seconds since the exporter's last sample: 2 min shipped
    # (15 s, not a few: on a loaded 2-core box a round of the exporter can wait seconds on
    # the broker's disk, and a normal run must not fire; a killed exporter still fires at
    # once through absent())
    "(kiban_queue_sample_timestamp_seconds) > 120": "(kiban_queue_sample_timestamp_seconds) > 15",
}
# Grafana's variables in the panel queries (a local Prometheus has no namespace label).
RATE_INTERVAL = "10s"


def _scale_window(alert: str, match: re.Match[str]) -> str:
    assert match["d"] in WINDOWS, f"{alert}: no scaled value for {match['d']}"
    return f"{match['pre']}{WINDOWS[match['d']]}{match['post']}"


def scaled_rules(text: str) -> dict[str, Any]:
    """alerts.yaml with the time scaled down for a test that lasts minutes, not days."""
    rules = yaml.safe_load(text)
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            for shipped, scaled in THRESHOLDS.items():
                expr = expr.replace(shipped, scaled)
            scale = functools.partial(_scale_window, rule["alert"])
            expr = re.sub(r"(?P<pre>\[)(?P<d>\d+[smhd])(?P<post>\])", scale, expr)
            expr = re.sub(r"(?P<pre>offset )(?P<d>\d+[smhd])(?P<post>)", scale, expr)
            rule["expr"] = expr
            if rule.get("for") not in (None, "0m", "0s"):
                rule["for"] = FOR_SCALED
    return rules


def test_scaled_rules_keep_the_expressions() -> None:
    rules = scaled_rules(ALERTS.read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert "[26h]" not in exprs["KibanNoNightlyRun"] and "[45s]" in exprs["KibanNoNightlyRun"]
    assert "offset 45s" in exprs["KibanNoNightlyRun"]
    assert "> 15" in exprs["KibanQueueExporterDown"]
    assert all(r.get("for") in ("0m", FOR_SCALED) for g in rules["groups"] for r in g["rules"])


# -- the queue exporter against a real redis-server (no Prometheus needed) -------------------


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    (port,) = free_ports(1)
    try:
        proc = start_redis(tmp_path / "redis", port)
    except KibanError as exc:  # no redis-server here: the message says how to get one
        pytest.skip(str(exc))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


def test_exporter_counts_every_priority_level_dead_letters_and_unacked(
    redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path, mode="distributed", broker_url=redis_url, encode_pools={"vit": "gpu"}
    )
    configure(settings)
    for priority in (0, 4, 7, 9):  # Celery's priority sub-queues: encode\x06\x16{3,6,9}
        app.send_task("kiban.encoder.encode_chunk", kwargs={}, queue="encode", priority=priority)
    app.send_task("kiban.encoder.encode_chunk", kwargs={}, queue="encode.gpu")
    app.send_task("kiban.deadletter", kwargs={}, queue="deadletter")
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.llen("encode") == 1 and client.llen("encode\x06\x169") == 1  # the layout
    sampler = QueueSampler(watched_queues(settings))
    depths, unacked = sampler.sample()
    assert depths["encode"] == 4 and depths["encode.gpu"] == 1 and depths["deadletter"] == 1
    assert depths["ingest"] == 0 and unacked == 0
    with app.connection_for_read() as conn:  # a worker takes one message, not yet acked
        message = conn.default_channel.basic_get("encode", no_ack=False)
        assert message is not None
        depths, unacked = sampler.sample()
        assert depths["encode"] == 3 and unacked == 1
    sampler.close()
    use_settings(None)


# -- a real Prometheus ------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    timings: dict[str, float] = field(default_factory=dict)

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:  # noqa: S310
            data = json.load(response)
        assert data["status"] == "success", data
        return data["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=1)["result"]

    def rule(self, alertname: str) -> dict[str, Any]:
        for group in self._get("/api/v1/rules")["groups"]:
            for rule in group["rules"]:
                if rule.get("name") == alertname:
                    return rule
        raise AssertionError(f"no rule {alertname}")

    def wait_firing(self, alertname: str, timeout: float, **labels: str) -> list[dict[str, Any]]:
        """Wait until ALERTS{alertname, labels} is firing; the firing series."""
        matchers = "".join(f',{k}="{v}"' for k, v in labels.items())
        expr = f'ALERTS{{alertname="{alertname}",alertstate="firing"{matchers}}}'
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            result = self.query(expr)
            if result:
                self.timings[alertname] = round(time.monotonic() - started, 1)
                return result
            time.sleep(0.5)
        rule = self.rule(alertname)
        raise AssertionError(
            f"{alertname}{labels} not firing after {timeout:.0f}s: state {rule.get('state')}, "
            f"health {rule.get('health')} {rule.get('lastError', '')}, "
            f"alerts {rule.get('alerts')}, expr {rule.get('query')}"
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
        return bool(response.status == 200)


@dataclass
class Scene:
    stack: LocalStack
    prom: Prometheus
    settings: Settings
    images: Path
    started: float
    ports: dict[str, int]
    normal_run: tuple[float, float] | None = None  # (start, end), Unix seconds


WORKERS = {  # name → (service, extra arguments)
    "ingest": ("ingest", ()),
    "encoder-0": ("encoder", ()),
    "encoder-1": ("encoder", ()),
    "indexer": ("indexer", ()),
    "exporter": ("exporter", ("--interval", "0.5")),
}


@pytest.fixture(scope="module")
def scene(
    tmp_path_factory: pytest.TempPathFactory, effnet_lite0: tuple[Any, Path]
) -> Iterator[Scene]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip(
            "prometheus not installed: the alerts and dashboard are proven against a real "
            "Prometheus here (apt-get install -y prometheus; CI installs it)"
        )
    started = time.monotonic()
    home = tmp_path_factory.mktemp("prom-stack")
    images = tmp_path_factory.mktemp("prom-images")
    generate_texture_dataset(images, n_classes=4, per_class=8, size=64, groups_per_class=4)
    env = {
        "KIBAN_CHUNK_SIZE": "16",
        "KIBAN_THREADS": "1",
        "KIBAN_VISIBILITY_TIMEOUT": "30",
        "KIBAN_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
    }
    with running_stack(home, [], extra_env=env) as stack:
        settings = stack_settings(stack, tmp_path_factory.mktemp("prom-client"))
        from kiban.models.registry import publish

        store = open_store(settings.resolved_store_uri, settings.s3_endpoint_url, create=True)
        card, path = effnet_lite0
        publish(store, card, path)  # before the workers start: they initialise its series
        ports = dict(zip(WORKERS, free_ports(len(WORKERS)), strict=True))
        for name, (service, extra) in WORKERS.items():
            stack.start_worker(service, name, "--metrics-port", str(ports[name]), *extra)
        for name in WORKERS:
            wait_until(
                lambda n=name: _http_ok(f"http://127.0.0.1:{ports[n]}/metrics"),
                120,
                f"metrics of {name} (log: {stack.procs[name].log()[-1500:]})",
            )
        prom = _start_prometheus(prometheus, home / "prometheus", ports)
        try:
            wait_until(lambda: _http_ok(f"{prom.url}/-/ready"), 60, "prometheus")
            # every worker consumes (ingest 1, two encoders 1 each, indexer: index + report)
            wait_until(
                lambda: len(prom.query("kiban_worker_consuming == 1")) == 5,
                120,
                "workers consuming, as Prometheus sees them",
            )
            prom.timings["stack up"] = round(time.monotonic() - started, 1)
            yield Scene(stack, prom, settings, images, started, ports)
        finally:
            prom.stop()
            print(f"\nreal-Prometheus timings (s): {prom.timings}")


def _start_prometheus(binary: str, root: Path, ports: dict[str, int]) -> Prometheus:
    root.mkdir(parents=True, exist_ok=True)
    (root / "alerts.yaml").write_text(yaml.safe_dump(scaled_rules(ALERTS.read_text())))
    jobs: dict[str, list[str]] = {}
    for name, port in ports.items():
        if name in WORKERS:
            jobs.setdefault(f"kiban-{WORKERS[name][0]}", []).append(f"127.0.0.1:{port}")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(root / "alerts.yaml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = _free_port()
    log_path = root / "prometheus.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{web}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    return Prometheus(f"http://127.0.0.1:{web}", proc, log_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _batch(scene: Scene, batch_id: str, manifest: Path) -> dict[str, Any]:
    return run_batch(
        scene.settings,
        scene.images.as_uri(),
        [MODEL],
        manifest=manifest.as_uri(),
        batch_id=batch_id,
        timeout=150,
    )


def _panel_queries(range_seconds: int) -> list[tuple[str, str]]:
    filled = {
        "$namespace": ".*",
        "$__rate_interval": RATE_INTERVAL,
        "$__range": f"{range_seconds}s",
    }
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in filled.items():
                expr = expr.replace(variable, value)
            queries.append((f"{panel['title']} [{target['refId']}]", expr))
    return queries


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(v != "NaN" for series in result for _, v in series.get("values", []))


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def _normal_run(scene: Scene) -> tuple[float, float]:
    """Two batches of series ``lot-`` (the second has a series, a baseline and a flag), once."""
    if scene.normal_run is None:
        # Earlier tests' buffered writes are flushed first: their writeback would stall the
        # broker's fsyncs and the scrapes of this run, whose alert windows are seconds.
        os.sync()
        t0 = time.time()
        manifest = scene.images / "manifest.csv"
        for batch in ("lot-0001", "lot-0002"):
            report = _batch(scene, batch, manifest)
            assert report["batch"]["n_accepted"] == 32
        scene.prom.timings["normal run (2 batches)"] = round(time.time() - t0, 1)
        time.sleep(3)  # the last scrapes and rule evaluations
        scene.normal_run = (t0, time.time())
    return scene.normal_run


def test_normal_run_fills_every_panel_and_fires_nothing(scene: Scene) -> None:
    prom = scene.prom
    t0, end = _normal_run(scene)
    span = int(end - t0) + 1

    empty = [
        name
        for name, expr in _panel_queries(span)
        if not _has_data(prom.query_range(expr, t0, end))
    ]
    assert not empty, f"dashboard panels without data in a normal run: {empty}"

    firing = prom.query(
        f'max_over_time(ALERTS{{alertstate="firing",alertname!="KibanNoNightlyRun"}}[{span}s])'
    )
    # KibanNoNightlyRun is left out: its scaled 26 h window is 45 s, shorter than the run
    assert not firing, f"alerts fired in a normal run: {[a['metric'] for a in firing]}"

    # the throughput is a rate of counters, and the counters saw the first batch whole
    images = prom.query(f'sum(increase(kiban_images_encoded_total{{model="{MODEL}"}}[{span}s]))')
    assert images and float(images[0]["value"][1]) >= 60  # 2 x 32, extrapolated

    # two encoders on one host are two Celery nodes
    configure(scene.settings)
    nodes = [name for reply in app.control.ping(timeout=3) for name in reply]
    encoders = [n for n in nodes if n.startswith("encoder-")]
    assert len(encoders) == 2 and len(set(encoders)) == 2, nodes
    assert all(re.fullmatch(r"encoder-\d+@.+", n) for n in encoders), encoders


def test_each_alert_fires_in_its_situation(scene: Scene, tmp_path: Path) -> None:
    prom, stack = scene.prom, scene.stack
    _normal_run(scene)  # the series' earlier batches (when this test runs alone)
    use_settings(scene.settings)
    configure(scene.settings)

    # 1. quality regression: the same images with shuffled labels
    rows = list(csv.reader((scene.images / "manifest.csv").open()))
    labels = [row[1] for row in rows[1:]]
    random.Random(7).shuffle(labels)
    shuffled = tmp_path / "shuffled.csv"
    with shuffled.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(rows[0])
        writer.writerows([[r[0], label, r[2]] for r, label in zip(rows[1:], labels, strict=True)])
    report = _batch(scene, "lot-0003", shuffled)
    last_success = time.monotonic()
    trend = {m["model"]: m for m in report["trend"]["models"]}
    assert trend[MODEL]["regression"], trend[MODEL]["statement"]  # the situation exists
    prom.wait_firing("KibanQualityRegression", 30, series="lot-", model=MODEL)

    # 2. the ingest worker's first dead letter: alerts from the first one
    before = prom.query('kiban_dead_letters_total{task="kiban.ingest.batch"}')
    assert before and float(before[0]["value"][1]) == 0
    app.send_task(
        "kiban.ingest.batch", kwargs={"message": {"batch_id": "../x", "source": ""}}, queue="ingest"
    )
    prom.wait_firing("KibanDeadLettersIncreasing", 30, task="kiban.ingest.batch")
    prom.wait_firing("KibanTaskFailureRate", 30, task="kiban.ingest.batch")

    # 3. a failed evaluation is not a nightly run: it counts as a failure only
    app.send_task(
        "kiban.reporter.evaluate_batch",
        kwargs={"message": {"batch_id": "never-ingested", "models": [MODEL]}},
        queue="report",
    )
    prom.wait_firing("KibanDeadLettersIncreasing", 30, task="kiban.reporter.evaluate_batch")
    evaluations = 'kiban_tasks_total{task="kiban.reporter.evaluate_batch"}'
    by_outcome = {r["metric"]["outcome"]: float(r["value"][1]) for r in prom.query(evaluations)}
    assert by_outcome["failure"] == 1 and by_outcome["success"] == 3, by_outcome  # lot-000[123]

    # 4. both encoders SIGKILLed while a batch's chunks wait
    for name in ("encoder-0", "encoder-1"):
        stack.procs[name].kill()
    dispatch(
        IngestBatch(
            batch_id="lot-0004",
            source=scene.images.as_uri(),
            manifest=(scene.images / "manifest.csv").as_uri(),
            plan=RunPlan(models=[MODEL]),
        ),
        scene.settings,
    )
    _wait(
        lambda: bool(prom.query('kiban_queue_length{queue="encode"} > 0')),
        60,
        "the chunks never reached the encode queue",
    )
    prom.wait_firing("KibanQueueWithoutWorkers", 30, queue="encode")
    prom.wait_firing("KibanBatchStalled", 60, queue="encode")
    prom.wait_firing("KibanEncodeStalled", 60)

    # 5. no successful evaluation for the (scaled) 26 h, though one failed meanwhile
    # fires 45 s (the scaled 26 h) after lot-0003's evaluation, plus `for`
    prom.wait_firing(
        "KibanNoNightlyRun", max(15.0, 45 + 3 + 20 - (time.monotonic() - last_success))
    )

    # 6. the queue exporter is gone: the alerts on waiting work are blind, and say so
    stack.procs["exporter"].kill()
    prom.wait_firing("KibanQueueExporterDown", 30)

    shipped = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert shipped <= set(prom.timings), f"not shown firing: {shipped - set(prom.timings)}"
    prom.timings["whole module"] = round(time.monotonic() - scene.started, 1)
    with contextlib.suppress(Exception):
        use_settings(None)
