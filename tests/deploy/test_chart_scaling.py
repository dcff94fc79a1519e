"""Autoscaling, disruption and the optional Qdrant server of the Helm chart, checked offline.

- ``charts/kiban/ci/keda-qdrant-values.yaml`` (KEDA scaling the encoder pools, ingest, indexer
  and reporter; a 3-node Qdrant cluster run by the chart) lints clean in strict mode, and its
  core objects (StatefulSet, PodDisruptionBudgets, Services, ...) pass
  ``kubernetes-validate --strict``.
- The KEDA objects (ScaledObject, TriggerAuthentication) are validated against KEDA's own CRD
  schemas, vendored as test data in ``tests/deploy/schemas/`` (source and commit in each file's
  header), with unknown fields refused.
- What a schema cannot see: every ScaledObject targets a Deployment the chart renders (and that
  Deployment leaves its replica count to KEDA); its triggers read exactly the Redis keys of the
  queues that Deployment consumes, priority lists included (derived from kombu itself); every
  PodDisruptionBudget selects exactly its workload's pods; the drain is sized from the chunk
  time; with ``qdrant.deploy`` every worker reaches the rendered Qdrant Service with the API key
  the server requires, and without it nothing of a Qdrant server is rendered.
"""

from __future__ import annotations

import base64
import copy
import math
import re
import types
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kombu.transport.redis import PRIORITY_STEPS, Channel

import kiban.celery_app
from kiban.settings import Settings
from tests.deploy.test_deploy import (
    CHART,
    KUBE_VERSIONS,
    RELEASE,
    configmap_env,
    container,
    deployments,
    full_values,
    helm,
    of_kind,
    render,
    workers,
)

SCALING_VALUES = CHART / "ci" / "keda-qdrant-values.yaml"
SCHEMAS = Path(__file__).parent / "schemas"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
# kubernetes-validate has no schema for these: ServiceMonitor/PrometheusRule are checked in
# test_deploy.py, the KEDA kinds here against their CRD schemas.
CRD_KINDS = KEDA_KINDS | {"ServiceMonitor", "PrometheusRule"}
SECRET = f"{RELEASE}-kiban-secrets"
QDRANT = f"{RELEASE}-kiban-qdrant"


def scaling_values() -> dict[str, Any]:
    return yaml.safe_load(SCALING_VALUES.read_text())


def chart_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="module")
def scaled() -> list[dict[str, Any]]:
    return render(scaling_values())


@pytest.fixture(scope="module")
def plain() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def full() -> list[dict[str, Any]]:
    return render(full_values())


def effective_env(deployment: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's variables as the kubelet sets them: envFrom ConfigMaps, then env."""
    box = container(deployment)
    configmaps = of_kind(objects, "ConfigMap")
    env: dict[str, Any] = {}
    for source in box.get("envFrom", []):
        data = configmaps[source["configMapRef"]["name"]]["data"]
        env.update({key: {"name": key, "value": value} for key, value in data.items()})
    env.update({e["name"]: e for e in box.get("env", [])})
    return env


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def consumed_queues(deployment: dict[str, Any]) -> list[str]:
    args = container(deployment)["args"]
    return args[args.index("--queues") + 1].split(",") if "--queues" in args else []


# -- lint, core schemas, KEDA schemas ------------------------------------------------------


def test_scaling_values_lint_clean_in_strict_mode() -> None:
    report = helm.lint(CHART, scaling_values(), strict=True, namespace="kiban")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_scaling_values_file_only_uses_known_keys() -> None:
    """A typo in the CI values file would silently test nothing."""
    free = {"extra", "labels", "nodeSelector", "resources", "requests", "limits", "advanced"}
    defaults = chart_defaults()
    budget_keys = set(defaults["podDisruptionBudget"])

    def keys(tree: Any, prefix: str = "") -> set[str]:
        out = set()
        if isinstance(tree, dict):
            for key, value in tree.items():
                out.add(prefix + key)
                if key == "podDisruptionBudget" and prefix:
                    # a workload's own budget takes the keys of the global one
                    assert set(value) <= budget_keys, (prefix, value)
                elif key not in free:
                    out |= keys(value, f"{prefix}{key}.")
        return out

    values = copy.deepcopy(scaling_values())
    pools = values["encoder"].pop("pools")
    # per-pool KEDA overrides take the keys of autoscaling.keda.encoder
    for name, override in values["autoscaling"]["keda"].pop("pools").items():
        assert name in {p["name"] for p in pools}, name
        assert set(override) <= set(defaults["autoscaling"]["keda"]["encoder"]), override
    assert keys(values) <= keys(defaults), sorted(keys(values) - keys(defaults))
    pool_keys = set().union(*(set(p) for p in defaults["encoder"]["pools"]))
    for pool in pools:
        assert set(pool) <= pool_keys, sorted(set(pool) - pool_keys)
        assert set(pool.get("podDisruptionBudget", {})) <= budget_keys, pool


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_core_objects_pass_kubernetes_strict_validation(
    scaled: list[dict[str, Any]], kube_version: str
) -> None:
    kinds = set()
    for obj in scaled:
        kinds.add(obj["kind"])
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            pytest.fail(f"{where} ({kube_version}): {exc.message} at {list(exc.path)}")
    assert {"StatefulSet", "PodDisruptionBudget", "Service", "Deployment"} <= kinds
    assert kinds >= KEDA_KINDS


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 schema as JSON Schema that refuses unknown fields (the API server's strict
    field validation): an object with `properties` and no `additionalProperties` is closed."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def keda_validator(kind: str) -> jsonschema.Draft202012Validator:
    plural = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}
    path = SCHEMAS / f"keda.sh_{plural[kind]}.v1alpha1.yaml"
    schema = _strict(yaml.safe_load(path.read_text())["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def test_keda_objects_match_their_crd_schema(scaled: list[dict[str, Any]]) -> None:
    found = set()
    for obj in scaled:
        if obj["kind"] not in KEDA_KINDS:
            continue
        found.add(obj["kind"])
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        name = obj["metadata"]["name"]
        assert DNS_SUBDOMAIN.match(name) and len(name) <= 253, name
        errors = sorted(keda_validator(obj["kind"]).iter_errors(obj), key=str)
        assert not errors, f"{obj['kind']}/{name}: " + "; ".join(
            f"{e.message} at {list(e.absolute_path)}" for e in errors
        )
    assert found == KEDA_KINDS


def test_the_keda_schema_check_catches_mistakes(scaled: list[dict[str, Any]]) -> None:
    """The check above is not vacuous: a number where KEDA wants a string, a misspelt field and
    a trigger without a type are each refused."""
    (scaled_object, *_) = of_kind(scaled, "ScaledObject").values()
    validator = keda_validator("ScaledObject")
    assert validator.is_valid(scaled_object)
    broken = copy.deepcopy(scaled_object)
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 4
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(scaled_object)
    broken["spec"]["minReplicas"] = broken["spec"].pop("minReplicaCount")
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(scaled_object)
    del broken["spec"]["triggers"][0]["type"]
    assert not validator.is_valid(broken)


# -- KEDA: targets, queue keys, Redis ---------------------------------------------------------


def celery_queue_keys(queue: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The Redis lists kombu keeps a queue in, with kiban's own transport options."""
    from celery import Celery

    monkeypatch.setattr(kiban.celery_app, "app", Celery("probe"))
    options = kiban.celery_app.configure(Settings()).conf.broker_transport_options
    stub = types.SimpleNamespace(
        sep=options.get("sep", Channel.sep),
        priority_steps=options.get("priority_steps", PRIORITY_STEPS),
    )
    stub.priority = lambda n: Channel.priority(stub, n)
    return {Channel._q_for_pri(stub, queue, step) for step in stub.priority_steps}


def test_every_scaled_object_targets_a_rendered_deployment_it_owns(
    scaled: list[dict[str, Any]],
) -> None:
    by_name = of_kind(scaled, "Deployment")
    targets = {}
    for name, scaled_object in of_kind(scaled, "ScaledObject").items():
        ref = scaled_object["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment"
        assert ref.get("apiVersion", "apps/v1") == "apps/v1"
        assert ref["name"] in by_name, f"{name} scales {ref['name']}, which is not rendered"
        target = by_name[ref["name"]]
        # a fixed count would be re-applied on every upgrade and fight KEDA
        assert "replicas" not in target["spec"], ref["name"]
        targets[target["metadata"]["labels"]["app.kubernetes.io/component"]] = scaled_object
    assert set(targets) == {"encoder-default", "encoder-gpu", "ingest", "indexer", "reporter"}
    # the rest keep their fixed count (beat: exactly one)
    for component, deployment in deployments(scaled).items():
        if component not in targets:
            assert deployment["spec"]["replicas"] >= 1, component
    # bounds: the encoder defaults, overridden for the gpu pool; scale to zero when idle
    spec = {c: so["spec"] for c, so in targets.items()}
    assert (
        spec["encoder-default"]["minReplicaCount"],
        spec["encoder-default"]["maxReplicaCount"],
    ) == (0, 6)
    assert (spec["encoder-gpu"]["minReplicaCount"], spec["encoder-gpu"]["maxReplicaCount"]) == (
        0,
        2,
    )
    assert spec["encoder-gpu"]["triggers"][0]["metadata"]["listLength"] == "16"
    for component, one in spec.items():
        assert one["cooldownPeriod"] == 600 and one["pollingInterval"] == 10, component
        assert 0 <= one["minReplicaCount"] <= one["maxReplicaCount"], component


def test_triggers_read_every_redis_key_of_the_consumed_queues(
    scaled: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    by_name = of_kind(scaled, "Deployment")
    auths = of_kind(scaled, "TriggerAuthentication")
    secret = of_kind(scaled, "Secret")[SECRET]
    for name, scaled_object in of_kind(scaled, "ScaledObject").items():
        target = by_name[scaled_object["spec"]["scaleTargetRef"]["name"]]
        queues = consumed_queues(target)
        assert queues, name
        wanted = set().union(*(celery_queue_keys(q, monkeypatch) for q in queues))
        assert len(wanted) == 4 * len(queues)  # the list and its priority lists 3, 6, 9
        triggers = scaled_object["spec"]["triggers"]
        assert all(t["type"] == "redis" for t in triggers)
        listed = [t["metadata"]["listName"] for t in triggers]
        assert sorted(listed) == sorted(wanted), name
        assert len({t["name"] for t in triggers}) == len(triggers)  # KEDA wants unique names
        for trigger in triggers:
            meta = trigger["metadata"]
            assert meta["address"] == f"{RELEASE}-kiban-redis:6379"
            assert meta["databaseIndex"] == "0" and meta["enableTLS"] == "false"
            assert int(meta["listLength"]) > 0 and int(meta["activationListLength"]) >= 0
            auth = auths[trigger["authenticationRef"]["name"]]
            (ref,) = auth["spec"]["secretTargetRef"]
            assert ref["parameter"] == "password"
            assert ref["name"] == SECRET and ref["key"] in secret["data"]
            # the password KEDA reads is the one the bundled Redis runs with
            redis = container(deployments(scaled)["redis"])
            (password,) = [e for e in redis["env"] if e["name"] == "REDIS_PASSWORD"]
            assert password["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": ref["key"]}


def test_keda_reads_the_broker_of_broker_url_and_authenticates_only_with_a_password() -> None:
    values = scaling_values()
    values["redis"] = {"enabled": False}
    values["broker"] = {"url": "rediss://queue.example.net:6380/2"}
    objects = render(values)
    assert not of_kind(objects, "TriggerAuthentication")  # no password anywhere: none
    for scaled_object in of_kind(objects, "ScaledObject").values():
        for trigger in scaled_object["spec"]["triggers"]:
            assert trigger["metadata"]["address"] == "queue.example.net:6380"
            assert trigger["metadata"]["databaseIndex"] == "2"
            assert trigger["metadata"]["enableTLS"] == "true"
            assert "authenticationRef" not in trigger
    values["secrets"] = {"redisPassword": "s3cret"}
    keda_redis = {"address": "10.0.0.5:6379", "enableTLS": False, "databaseIndex": 0}
    values["autoscaling"]["keda"]["redis"] = keda_redis
    objects = render(values)
    assert len(of_kind(objects, "TriggerAuthentication")) == 1
    for scaled_object in of_kind(objects, "ScaledObject").values():
        for trigger in scaled_object["spec"]["triggers"]:
            assert trigger["metadata"]["address"] == "10.0.0.5:6379"
            assert trigger["metadata"]["enableTLS"] == "false"
            assert trigger["metadata"]["databaseIndex"] == "0"
            assert trigger["authenticationRef"]["name"] == f"{RELEASE}-kiban-keda-redis"
    values["autoscaling"]["keda"]["redis"] = {"address": "redis://nope:6379/0"}
    with pytest.raises(helm.HelmError, match="host:port"):
        render(values)


def test_keda_is_off_by_default(plain: list[dict[str, Any]], full: list[dict[str, Any]]) -> None:
    for objects in (plain, full):
        assert not {o["kind"] for o in objects} & KEDA_KINDS
        for component, deployment in deployments(objects).items():
            assert deployment["spec"]["replicas"] >= 1, component


def test_the_local_mode_indexer_is_never_autoscaled() -> None:
    values = {"autoscaling": {"keda": {"enabled": True, "indexer": {"enabled": True}}}}
    with pytest.raises(helm.HelmError, match="single writer"):
        render(values)
    values = {"autoscaling": {"keda": {"enabled": True}}}
    scaled_objects = of_kind(render(values), "ScaledObject")
    assert set(scaled_objects) == {f"{RELEASE}-kiban-encoder-default"}


def test_bad_keda_bounds_are_refused() -> None:
    values = {"autoscaling": {"keda": {"enabled": True, "encoder": {"minReplicaCount": 3}}}}
    values["autoscaling"]["keda"]["encoder"]["maxReplicaCount"] = 2
    with pytest.raises(helm.HelmError, match="minReplicaCount"):
        render(values)
    values = {"autoscaling": {"keda": {"enabled": True, "encoder": {"listLength": 0}}}}
    with pytest.raises(helm.HelmError, match="listLength"):
        render(values)
    values = {"autoscaling": {"keda": {"enabled": True, "pools": {"gup": {"maxReplicaCount": 1}}}}}
    with pytest.raises(helm.HelmError, match="no encoder pool gup"):
        render(values)


# -- disruption budgets and drain ------------------------------------------------------------


def _workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**of_kind(objects, "Deployment"), **of_kind(objects, "StatefulSet")}


@pytest.mark.parametrize("values", ["default", "full", "scaling"])
def test_a_disruption_budget_selects_exactly_its_workloads_pods(values: str) -> None:
    objects = render({"default": None, "full": full_values(), "scaling": scaling_values()}[values])
    budgets = of_kind(objects, "PodDisruptionBudget")
    workloads = _workloads(objects)
    scaled_names = {
        so["spec"]["scaleTargetRef"]["name"] for so in of_kind(objects, "ScaledObject").values()
    }
    protected = set()
    for name, budget in budgets.items():
        spec = budget["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec), name
        wanted = spec["selector"]["matchLabels"]
        selected = [w for w, obj in workloads.items() if wanted.items() <= pod_labels(obj).items()]
        assert selected == [name], f"{name} selects the pods of {selected}"
        assert wanted == workloads[name]["spec"]["selector"]["matchLabels"], name
        protected.add(name)
    # every kiban workload with pods has one (the bundled Redis is not a kiban service)
    for name, workload in workloads.items():
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] == "redis":
            continue
        if name in scaled_names or workload["spec"].get("replicas", 1) > 0:
            assert name in protected, name
    assert {f"{RELEASE}-kiban-{c}" for c in workers(objects)} <= protected


def test_scaling_values_budgets(scaled: list[dict[str, Any]]) -> None:
    budgets = {n: b["spec"] for n, b in of_kind(scaled, "PodDisruptionBudget").items()}
    assert budgets[f"{RELEASE}-kiban-encoder-default"]["maxUnavailable"] == "50%"  # global
    assert budgets[f"{RELEASE}-kiban-encoder-gpu"]["maxUnavailable"] == 1  # pool's own
    assert budgets[f"{RELEASE}-kiban-ingest"] == {  # its own pair replaces the global one
        "minAvailable": 0,
        "selector": budgets[f"{RELEASE}-kiban-ingest"]["selector"],
    }
    assert budgets[QDRANT]["maxUnavailable"] == 1


def test_budgets_that_would_block_a_drain_or_protect_nothing() -> None:
    # no pods, no budget
    objects = render({"ingest": {"replicas": 0}})
    assert f"{RELEASE}-kiban-ingest" not in of_kind(objects, "PodDisruptionBudget")
    assert f"{RELEASE}-kiban-indexer" in of_kind(objects, "PodDisruptionBudget")
    # ... unless KEDA may start some
    idle_pool = {**chart_defaults()["encoder"]["pools"][0], "replicas": 0}
    values = {"autoscaling": {"keda": {"enabled": True}}, "encoder": {"pools": [idle_pool]}}
    assert f"{RELEASE}-kiban-encoder-default" in of_kind(render(values), "PodDisruptionBudget")
    # a single pod that may never be evicted: a node drain would hang
    with pytest.raises(helm.HelmError, match="never evict"):
        render({"podDisruptionBudget": {"minAvailable": 1}})
    idle_pool["podDisruptionBudget"] = {"minAvailable": 8}  # the pool's maxReplicaCount
    with pytest.raises(helm.HelmError, match="maxReplicaCount"):
        render(values)
    with pytest.raises(helm.HelmError, match="not both"):
        render({"podDisruptionBudget": {"minAvailable": "50%", "maxUnavailable": 1}})
    with pytest.raises(helm.HelmError, match="never evict"):
        render({"qdrant": {"deploy": True, "server": {"podDisruptionBudget": {"minAvailable": 1}}}})
    # a percentage is the operator's choice
    objects = render({"podDisruptionBudget": {"minAvailable": "50%"}})
    assert (
        of_kind(objects, "PodDisruptionBudget")[f"{RELEASE}-kiban-ingest"]["spec"]["minAvailable"]
        == "50%"
    )
    assert not of_kind(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")


def _grace(deployment: dict[str, Any]) -> int:
    return deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_the_drain_is_sized_from_the_chunk_time(
    plain: list[dict[str, Any]], full: list[dict[str, Any]], scaled: list[dict[str, Any]]
) -> None:
    defaults = chart_defaults()
    drain = defaults["encoder"]["drain"]

    def sized(chunk: int, images_per_second: float) -> int:
        return math.ceil(chunk / images_per_second * drain["factor"]) + drain["marginSeconds"]

    chunk = defaults["config"]["chunkSize"]
    pool = defaults["encoder"]["pools"][0]
    assert _grace(workers(plain)["encoder-default"]) == sized(chunk, pool["imagesPerSecond"]) == 95
    values = scaling_values()
    for entry in values["encoder"]["pools"]:
        deployment = workers(scaled)[f"encoder-{entry['name']}"]
        expected = sized(values["config"]["chunkSize"], entry["imagesPerSecond"])
        assert _grace(deployment) == expected
        # room for a whole chunk at the pool's speed, twice over
        assert _grace(deployment) > 2 * values["config"]["chunkSize"] / entry["imagesPerSecond"]
    # a given value wins
    assert _grace(workers(full)["encoder-gpu"]) == 300
    # the local-mode indexer evaluates batches too: the reporter's drain
    assert (
        _grace(workers(plain)["indexer"]) == defaults["reporter"]["terminationGracePeriodSeconds"]
    )
    assert (
        _grace(workers(scaled)["indexer"]) == defaults["indexer"]["terminationGracePeriodSeconds"]
    )
    for component in ("ingest", "reporter", "trainer", "beat"):
        assert (
            _grace(workers(scaled)[component])
            == defaults[component]["terminationGracePeriodSeconds"]
        )
    with pytest.raises(helm.HelmError, match="imagesPerSecond"):
        render({"encoder": {"pools": [{**pool, "imagesPerSecond": 0}]}})


# -- the Qdrant server ----------------------------------------------------------------------


def test_qdrant_server_statefulset(scaled: list[dict[str, Any]]) -> None:
    (statefulset,) = of_kind(scaled, "StatefulSet").values()
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    box = container(statefulset)
    repository, tag = box["image"].split(":")
    assert repository == "qdrant/qdrant" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), box["image"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    # a persistent volume per pod, mounted where Qdrant keeps its collections and snapshots
    claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in box["volumeMounts"]}
    assert mounts["storage"] == "/qdrant/storage" and "storage" in claims
    assert claims["storage"]["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert claims["storage"]["spec"]["storageClassName"] == "fast-ssd"
    assert mounts["snapshots"] == "/qdrant/snapshots" and "snapshots" in claims
    volumes = {v["name"] for v in pod["volumes"]}
    assert set(mounts) <= volumes | set(claims)
    # the Services: a headless one for the pods' stable names, a client one for the workers
    services = of_kind(scaled, "Service")
    headless = services[spec["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    for service in (headless, services[QDRANT]["spec"]):
        assert service["selector"].items() <= pod_labels(statefulset).items()
    # probes on Qdrant's health endpoints
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    assert ports == {"http": 6333, "grpc": 6334, "p2p": 6335}
    assert box["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert box["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert box["startupProbe"]["httpGet"]["path"] == "/livez"
    # the API key: required, from the Secret, generated when the values give none
    env = {e["name"]: e for e in box["env"]}
    ref = env["QDRANT__SERVICE__API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": SECRET, "key": "qdrant-api-key"}  # not optional
    key = base64.b64decode(of_kind(scaled, "Secret")[SECRET]["data"]["qdrant-api-key"])
    assert len(key) == 32
    # cluster mode: pod 0 starts the cluster, the others join it through the headless Service
    assert env["QDRANT__CLUSTER__ENABLED"]["value"] == "true"
    assert env["QDRANT__STORAGE__COLLECTION__REPLICATION_FACTOR"]["value"] == "2"
    script = box["args"][0]
    assert f'--bootstrap "http://{QDRANT}-0.{spec["serviceName"]}:6335"' in script
    assert "p2p" in {p["name"] for p in headless["ports"]}
    # locked down like the workers
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    assert box["resources"]["limits"]["memory"]


def test_every_worker_uses_the_rendered_qdrant_service(scaled: list[dict[str, Any]]) -> None:
    (statefulset,) = of_kind(scaled, "StatefulSet").values()
    server_key = {e["name"]: e for e in container(statefulset)["env"]}["QDRANT__SERVICE__API_KEY"]
    services = of_kind(scaled, "Service")
    for component, deployment in workers(scaled).items():
        env = effective_env(deployment, scaled)
        url = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env["KIBAN_QDRANT_URL"]["value"])
        assert url, env["KIBAN_QDRANT_URL"]
        service = services[url[1]]
        assert service["spec"]["selector"].items() <= pod_labels(statefulset).items()
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == int(url[2])]
        assert port["targetPort"] == "http"
        key = env["KIBAN_QDRANT_API_KEY"]["valueFrom"]["secretKeyRef"]
        server = server_key["valueFrom"]["secretKeyRef"]
        assert (key["name"], key["key"]) == (server["name"], server["key"]), component
        assert "KIBAN_QDRANT_PATH" not in env, component
    # no single writer: the reporter runs beside the indexer, which rolls like any worker
    assert "reporter" in workers(scaled)
    indexer = workers(scaled)["indexer"]
    assert consumed_queues(indexer) == ["index"]
    assert indexer["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "qdrant" not in {v["name"] for v in indexer["spec"]["template"]["spec"]["volumes"]}
    assert not of_kind(scaled, "PersistentVolumeClaim").get(QDRANT)


def test_a_single_node_qdrant_server() -> None:
    objects = render({"qdrant": {"deploy": True}})
    (statefulset,) = of_kind(objects, "StatefulSet").values()
    box = container(statefulset)
    assert statefulset["spec"]["replicas"] == 1
    assert "command" not in box and "args" not in box  # the image's own entry point
    env = {e["name"] for e in box["env"]}
    assert not {n for n in env if n.startswith("QDRANT__CLUSTER__")}
    assert "p2p" not in {p["name"] for p in box["ports"]}
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["snapshots"]
    assert configmap_env(objects)["KIBAN_QDRANT_URL"] == f"http://{QDRANT}:6333"
    assert of_kind(objects, "PodDisruptionBudget")[QDRANT]["spec"]["maxUnavailable"] == 1
    for kube_version in KUBE_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, kube_version, strict=True)
    # an existing Secret provides the key: nothing generated, the server still requires it
    objects = render({"qdrant": {"deploy": True}, "secrets": {"existingSecret": "prod"}})
    (statefulset,) = of_kind(objects, "StatefulSet").values()
    ref = {e["name"]: e for e in container(statefulset)["env"]}["QDRANT__SERVICE__API_KEY"]
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "prod", "key": "qdrant-api-key"}


def test_nothing_of_a_qdrant_server_without_deploy(
    plain: list[dict[str, Any]], full: list[dict[str, Any]]
) -> None:
    for objects in (plain, full):
        assert not of_kind(objects, "StatefulSet")
        names = {o["metadata"]["name"] for o in objects}
        assert not {n for n in names if n.startswith(QDRANT) and n != QDRANT}
        assert QDRANT not in of_kind(objects, "Service")
        assert QDRANT not in of_kind(objects, "PodDisruptionBudget")
        for deployment in deployments(objects).values():
            env = {e["name"] for e in container(deployment).get("env", [])}
            assert not {n for n in env if n.startswith("QDRANT__")}
    # local mode unchanged: no URL, the indexer's own volume
    assert "KIBAN_QDRANT_URL" not in configmap_env(plain)
    assert QDRANT in of_kind(plain, "PersistentVolumeClaim")
    # an external server: its URL, nothing run
    assert configmap_env(full)["KIBAN_QDRANT_URL"] == full_values()["qdrant"]["url"]
    assert "qdrant-api-key" not in of_kind(plain, "Secret")[SECRET]["data"]


def test_an_external_url_and_a_deployed_server_exclude_each_other() -> None:
    with pytest.raises(helm.HelmError, match="exclude each other"):
        render({"qdrant": {"deploy": True, "url": "http://qdrant.vector:6333"}})


# -- metrics: bind address, the queue exporter ---------------------------------------------------


def test_one_queue_exporter_that_keda_never_scales(scaled: list[dict[str, Any]]) -> None:
    """The exporter is the only source of the queue depths: exactly one, always running."""
    from kiban.worker import build_parser

    exporter = workers(scaled)["exporter"]
    assert exporter["spec"]["replicas"] == 1
    assert exporter["spec"]["strategy"]["type"] == "Recreate"
    args = build_parser().parse_args(container(exporter)["args"])
    assert (args.service, args.interval, args.queues) == ("exporter", 2.0, None)
    targets = {
        so["spec"]["scaleTargetRef"]["name"] for so in of_kind(scaled, "ScaledObject").values()
    }
    assert exporter["metadata"]["name"] not in targets
    assert "exporter" not in workers(render({"exporter": {"enabled": False}}))


@pytest.mark.parametrize("values", ["default", "full", "scaling"])
def test_workers_serve_metrics_on_all_interfaces(values: str) -> None:
    objects = render({"default": None, "full": full_values(), "scaling": scaling_values()}[values])
    assert "metrics_host" in Settings.model_fields
    for component, deployment in workers(objects).items():
        env = effective_env(deployment, objects)
        assert env["KIBAN_METRICS_HOST"]["value"] == "0.0.0.0", component


def test_the_redelivery_timeout_is_kibans_own_unless_overridden(
    plain: list[dict[str, Any]],
) -> None:
    """The chart does not pin KIBAN_VISIBILITY_TIMEOUT: kiban's default belongs with its
    redelivery mechanism (a value that outlived it would delay a killed worker's chunk)."""
    assert "KIBAN_VISIBILITY_TIMEOUT" not in configmap_env(plain)
    objects = render({"config": {"visibilityTimeout": 300}})
    assert configmap_env(objects)["KIBAN_VISIBILITY_TIMEOUT"] == "300"
