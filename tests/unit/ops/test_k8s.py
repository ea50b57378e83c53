"""ops/k8s renders, and what it renders is valid and means what the comments say.

Both overlays are rendered with the pinned kustomize (``ops/k8s/install-kustomize.sh`` builds
it into ``.cache/bin`` when missing; ``kubectl kustomize`` is the fallback). Every Kubernetes
object is validated offline against the API schemas ``kubernetes-validate`` ships; the KEDA
ScaledObjects, which those schemas do not cover, against :data:`SCALED_OBJECT`, written from
KEDA's ScaledObject CRD and its Kafka scaler. Then the cross-object promises: each stage's
worker id comes from its pod name, its probes hit its metrics port, its grace period outlasts
a drain, a PDB covers it, and its ScaledObject watches the group and topics the workers really
use (computed with the product's own settings from the rendered ConfigMap).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from stages.committers import WATCHDOG_TIMEOUTS
from streaminfer.cli import build_parser
from streaminfer.config_doc import variables
from streaminfer.settings import GROUPS, Settings
from streaminfer.wiring import input_topics, static_member
from tests.helpers import REPO

# A first build of kustomize compiles for minutes (fixture setup counts against the timeout).
pytestmark = pytest.mark.timeout(900)

K8S = REPO / "ops" / "k8s"
OVERLAYS = ("dev", "prod")
STAGES = ("validate", "infer", "persist")
EXACTLY_ONCE = ("validate", "infer")  # persist is always at-least-once (Redis)
# Oldest Kubernetes the manifests promise to work on, and the newest the package knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
MEASURED_RSS_MIB = 120  # bench/README.md: 100-120 MB RSS per stage worker

Obj = dict[str, Any]

# KEDA's ScaledObject (keda.sh/v1alpha1), from the CRD config/crd/bases/keda.sh_scaledobjects.yaml
# of kedacore/keda (v2.20): every field of spec, so a misspelt or invented one fails. Trigger
# metadata of type kafka: the keys pkg/scalers/kafka_scaler.go reads from trigger metadata
# (authentication keys belong in a TriggerAuthentication), all strings, as the CRD requires.
_INT = {"type": "integer"}
_SCALING_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "tolerance": {"type": ["integer", "string"]},
    },
}
KAFKA_METADATA_KEYS = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "partitionLimitation",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "excludePersistentLag",
    "scaleToZeroOnInvalidOffset",
    "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions",
    "fullMetadata",
    "version",
    "tls",
    "unsafeSsl",
    "sasl",
    "saslTokenProvider",
    "awsRegion",
}
_BOOL = {"enum": ["true", "false"]}
KAFKA_TRIGGER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "metadata"],
    "properties": {
        "type": {"const": "kafka"},
        "name": {"type": "string"},
        "metricType": {"enum": ["AverageValue", "Value"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
            },
        },
        "metadata": {
            "type": "object",
            # We always name the topic: without it KEDA sums every topic the group committed.
            "required": ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"],
            "propertyNames": {"enum": sorted(KAFKA_METADATA_KEYS)},
            "additionalProperties": {"type": "string"},
            "properties": {
                "bootstrapServers": {"type": "string", "pattern": r"^[^,\s]+:\d+(,[^,\s]+:\d+)*$"},
                "lagThreshold": {"type": "string", "pattern": r"^[1-9][0-9]*$"},
                "activationLagThreshold": {"type": "string", "pattern": r"^[0-9]+$"},
                "offsetResetPolicy": {"enum": ["latest", "earliest"]},
                "allowIdleConsumers": _BOOL,
                "excludePersistentLag": _BOOL,
                "scaleToZeroOnInvalidOffset": _BOOL,
                "limitToPartitionsWithLag": _BOOL,
            },
        },
    },
}
SCALED_OBJECT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers", "minReplicaCount", "maxReplicaCount"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 0},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                                "scalingModifiers",
                            ]
                        },
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "scaleUp": _SCALING_RULES,
                                        "scaleDown": _SCALING_RULES,
                                    },
                                },
                            },
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {"type": "array", "minItems": 1, "items": KAFKA_TRIGGER},
            },
        },
    },
}


# --- rendering -----------------------------------------------------------------------------


def _kustomize_command() -> list[str] | None:
    """The pinned kustomize when it is built, else ``kubectl kustomize`` (same output; the
    machines ship kubectl, so CI skips a ~4.5 min Go build), else build the pinned one."""
    pinned = REPO / ".cache" / "bin" / "kustomize"
    if pinned.exists():
        return [str(pinned), "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    try:
        done = subprocess.run(
            ["bash", str(K8S / "install-kustomize.sh")],
            capture_output=True,
            text=True,
            timeout=840,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode == 0:
        return [done.stdout.strip().splitlines()[-1], "build"]
    return None


@pytest.fixture(scope="module")
def kustomize() -> list[str]:
    command = _kustomize_command()
    if command is None:
        pytest.skip(
            "no kustomize: ops/k8s/install-kustomize.sh failed (it needs Go 1.22+ and the Go "
            "module proxy) and kubectl is not installed"
        )
    return command


@cache
def _render(command: tuple[str, ...], overlay: str) -> tuple[Obj, ...]:
    done = subprocess.run(
        [*command, str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(kustomize: list[str], overlay: str) -> tuple[Obj, ...]:
    return _render(tuple(kustomize), overlay)


def _of_kind(objects: tuple[Obj, ...], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _config(objects: tuple[Obj, ...]) -> dict[str, str]:
    maps = [
        o for name, o in _of_kind(objects, "ConfigMap").items() if name.startswith("streaminfer")
    ]
    assert len(maps) == 1
    data: dict[str, str] = maps[0]["data"]
    return data


def _stage(objects: tuple[Obj, ...], name: str) -> Obj:
    workload: Obj = _of_kind(objects, "StatefulSet")[name]
    return workload


def _container(workload: Obj) -> Obj:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Obj = containers[0]
    return container


@pytest.fixture
def prod(kustomize: list[str]) -> tuple[Obj, ...]:
    """The prod render: the one with the ScaledObjects (dev runs without KEDA)."""
    return _render(tuple(kustomize), "prod")


def _settings_of(objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The product's settings as a pod of this render sees them (ConfigMap only, no .env)."""
    for name in list(os.environ):
        if name.startswith("STREAMINFER_") or name in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
            monkeypatch.delenv(name)
    for name, value in _config(objects).items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture
def settings(objects: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch) -> Settings:
    return _settings_of(objects, monkeypatch)


@pytest.fixture
def prod_settings(prod: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch) -> Settings:
    return _settings_of(prod, monkeypatch)


# --- every object is valid -----------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_object_matches_the_api_schema(
    objects: tuple[Obj, ...], version: str
) -> None:
    checked = 0
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # not a Kubernetes API: checked against KEDA's spec below
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 10


def test_the_scaled_objects_match_kedas_spec(prod: tuple[Obj, ...]) -> None:
    scaled = _of_kind(prod, "ScaledObject")
    assert set(scaled) == set(STAGES)
    for obj in scaled.values():
        jsonschema.validate(obj, SCALED_OBJECT)
        spec = obj["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_the_keda_schema_rejects_what_keda_would(prod: tuple[Obj, ...]) -> None:
    """The schema above is strict where it matters (else the test before proves little)."""
    good = _of_kind(prod, "ScaledObject")["infer"]
    jsonschema.validate(good, SCALED_OBJECT)
    metadata = good["spec"]["triggers"][0]["metadata"]
    for bad_metadata in (
        {**metadata, "lagThreshold": 20000},  # the CRD: metadata values are strings
        {**metadata, "lagTreshold": "20000"},  # misspelt: KEDA would use its default, 10
        {k: v for k, v in metadata.items() if k != "consumerGroup"},
    ):
        bad = copy.deepcopy(good)
        bad["spec"]["triggers"][0]["metadata"] = bad_metadata
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCALED_OBJECT)
    bad = copy.deepcopy(good)
    bad["spec"]["maxReplicas"] = 3  # the HPA's name for it, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT)


def test_every_container_runs_a_real_command(objects: tuple[Obj, ...]) -> None:
    ours = list(_our_containers(objects))
    assert len(ours) == 5  # ingest, validate, infer, persist, topics
    for container in ours:
        build_parser().parse_args(container["args"])  # SystemExit (a failure) if unknown


def test_the_config_map_is_settings_the_product_reads(
    objects: tuple[Obj, ...], settings: Settings
) -> None:
    known: set[str] = set()
    for group in [Settings, *GROUPS.values()]:
        for name, field in group.model_fields.items():
            known.update(variables(group, name, field))
    config = _config(objects)
    assert set(config) <= known, set(config) - known
    # Values parse (the fixture built Settings from them) and say what the manifests assume.
    assert settings.stage.metrics_port is not None
    assert settings.stage.metrics_host not in ("127.0.0.1", "localhost")
    assert settings.ingest.host == "0.0.0.0"
    assert settings.kafka.bootstrap_servers == config["KAFKA_BOOTSTRAP_SERVERS"]


# --- the stage workloads -------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_the_worker_id_is_the_pod_name(
    objects: tuple[Obj, ...], settings: Settings, stage: str
) -> None:
    workload = _stage(objects, stage)
    assert workload["spec"]["serviceName"] in _of_kind(objects, "Service")
    env = {e["name"]: e for e in _container(workload).get("env", [])}
    assert "STREAMINFER_WORKER_ID" not in env
    source = env["STREAMINFER_STAGE_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert source == "metadata.name"
    # What a pod named <stage>-1 then uses, computed by the product itself.
    pod = settings.with_changes(stage={"worker_id": f"{stage}-1"})
    expected = f"{settings.group_id(stage)}.{stage}-1.0"
    assert pod.transactional_id(stage, 0) == expected
    assert static_member(pod, stage, 0) == {"group.instance.id": expected}  # type: ignore[arg-type]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_probes_hit_the_metrics_port(
    objects: tuple[Obj, ...], settings: Settings, stage: str
) -> None:
    container = _container(_stage(objects, stage))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/metrics"
        assert ports.get(get["port"], get["port"]) == settings.stage.metrics_port
    annotations = _stage(objects, stage)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.stage.metrics_port)


@pytest.mark.parametrize("stage", STAGES)
def test_the_grace_period_outlasts_a_drain(
    objects: tuple[Obj, ...], settings: Settings, stage: str
) -> None:
    # A drain waits at most the delivery timeout per Kafka call; a transactional call that
    # blocks anyway is ended by the watchdog (stages/committers.py) after a few times it.
    watchdog_s = WATCHDOG_TIMEOUTS * settings.kafka.delivery_timeout_s
    grace = _stage(objects, stage)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > watchdog_s


@pytest.mark.parametrize("stage", STAGES)
def test_stage_resources_cover_the_measured_footprint(
    objects: tuple[Obj, ...], overlay: str, stage: str
) -> None:
    resources = _container(_stage(objects, stage))["resources"]
    assert _mebibytes(resources["requests"]["memory"]) > MEASURED_RSS_MIB
    assert _millicores(resources["requests"]["cpu"]) > 0
    if overlay == "prod":
        assert _mebibytes(resources["limits"]["memory"]) >= 2 * MEASURED_RSS_MIB
        assert _millicores(resources["limits"]["cpu"]) >= _millicores(resources["requests"]["cpu"])


@pytest.mark.parametrize("name", [*STAGES, "ingest"])
def test_a_disruption_budget_covers_each_workload(objects: tuple[Obj, ...], name: str) -> None:
    kind = "Deployment" if name == "ingest" else "StatefulSet"
    labels = _of_kind(objects, kind)[name]["spec"]["template"]["metadata"]["labels"]
    matching = [
        pdb
        for pdb in _of_kind(objects, "PodDisruptionBudget").values()
        if pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(matching) == 1
    # maxUnavailable, so that a single replica can still be drained off its node.
    assert matching[0]["spec"]["maxUnavailable"] == 1


def test_the_stage_workloads_are_one_shape(objects: tuple[Obj, ...]) -> None:
    def shape(stage: str) -> str:
        # The stage's name where it stands alone (not inside "streaminfer").
        return re.sub(rf"(?<![a-z]){stage}", "STAGE", yaml.safe_dump(_stage(objects, stage)))

    assert shape("validate") == shape("infer") == shape("persist")


# --- autoscaling ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_scales_on_its_own_groups_lag(
    prod: tuple[Obj, ...], prod_settings: Settings, stage: str
) -> None:
    settings = prod_settings
    scaled = _of_kind(prod, "ScaledObject")[stage]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", stage)
    assert stage in _of_kind(prod, "StatefulSet")
    triggers = scaled["spec"]["triggers"]
    assert {t["metadata"]["topic"] for t in triggers} == set(input_topics(settings, stage))  # type: ignore[arg-type]
    for trigger in triggers:
        metadata = trigger["metadata"]
        assert metadata["consumerGroup"] == settings.group_id(stage)
        assert metadata["bootstrapServers"] == settings.kafka.bootstrap_servers
        assert metadata.get("allowIdleConsumers", "false") == "false"
        # An idle exactly-once partition shows a lag of 1 (the commit marker).
        assert int(metadata["lagThreshold"]) > settings.kafka.topic_partitions


@pytest.mark.parametrize("stage", STAGES)
def test_replicas_stay_within_the_partitions_and_never_reach_zero(
    prod: tuple[Obj, ...], prod_settings: Settings, stage: str
) -> None:
    spec = _of_kind(prod, "ScaledObject")[stage]["spec"]
    assert spec["maxReplicaCount"] == prod_settings.kafka.topic_partitions
    assert spec["minReplicaCount"] >= 1
    assert "idleReplicaCount" not in spec
    # The HPA owns the count: a replicas field would reset it on every apply.
    assert "replicas" not in _stage(prod, stage)["spec"]


def test_dev_runs_one_of_everything_without_keda(kustomize: list[str]) -> None:
    dev = _render(tuple(kustomize), "dev")
    assert not _of_kind(dev, "ScaledObject")
    workloads = [*_of_kind(dev, "StatefulSet").values(), *_of_kind(dev, "Deployment").values()]
    assert {o["metadata"]["name"] for o in workloads} >= {*STAGES, "ingest", "kafka", "redis"}
    assert {o["spec"]["replicas"] for o in workloads} == {1}
    # Everything in one namespace, the broker and Redis included (the names resolve).
    assert {o["metadata"]["namespace"] for o in dev if o["kind"] != "Namespace"} == {"streaminfer"}


def test_prod_is_bigger_and_replicated(kustomize: list[str]) -> None:
    dev, prod = (_render(tuple(kustomize), name) for name in OVERLAYS)
    assert _config(prod)["STREAMINFER_KAFKA_TOPIC_REPLICATION_FACTOR"] == "3"
    partitions = "STREAMINFER_KAFKA_TOPIC_PARTITIONS"
    assert int(_config(prod)[partitions]) > int(_config(dev)[partitions])
    assert _config(prod)["KAFKA_BOOTSTRAP_SERVERS"].endswith(".svc.cluster.local:9092")
    minimum = {o["spec"]["minReplicaCount"] for o in _of_kind(prod, "ScaledObject").values()}
    assert minimum == {2}
    assert _of_kind(prod, "Deployment")["ingest"]["spec"]["replicas"] > 1
    assert "kafka" not in _of_kind(prod, "StatefulSet")  # prod brings no broker of its own


# --- ingest and topics ---------------------------------------------------------------------


def test_ingest_is_probed_and_served(objects: tuple[Obj, ...], settings: Settings) -> None:
    ingest = _of_kind(objects, "Deployment")["ingest"]
    container = _container(ingest)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == settings.ingest.port
    service = _of_kind(objects, "Service")["ingest"]
    labels = ingest["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_topics_job_uses_the_config(objects: tuple[Obj, ...]) -> None:
    job = _of_kind(objects, "Job")["topics"]
    container = _container(job)
    assert container["args"] == ["topics", "create"]
    config_name = next(iter(n for n in _of_kind(objects, "ConfigMap") if "streaminfer" in n))
    assert {"configMapRef": {"name": config_name}} in container["envFrom"]


def test_every_workload_reads_the_generated_config_map(objects: tuple[Obj, ...]) -> None:
    names = set(_of_kind(objects, "ConfigMap"))
    for container in _our_containers(objects):
        refs = {s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s}
        assert refs and refs <= names


def _our_containers(objects: tuple[Obj, ...]) -> Iterator[Obj]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                if container["image"].split(":")[0].endswith("streaminfer"):
                    yield container


def _mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity)
    assert match, quantity
    return float(match[1]) * (1024 if match[2] == "Gi" else 1)


def _millicores(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000
