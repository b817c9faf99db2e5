"""infra/k8s rendered by `kubectl kustomize`, validated against the Kubernetes schemas.

Every built-in object must pass `kubernetes_validate` (strict: no unknown fields); the
RabbitmqCluster custom resource is checked by hand. Then the shape the deployment needs:
the objects, the aggregator's PVC and `Recreate`, probes/resources/security on every
container, references that resolve, settings that exist, credentials that match.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from services.aggregator.task import load_task
from services.common.topology import updates_queue

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
TREES = ("base", "overlays/example", "overlays/tls", "overlays/monitoring")
KUBERNETES_VERSION = "1.30.0"
"""Oldest Kubernetes the manifests target (the pod-index label is on by default since 1.28)."""
CUSTOM_KINDS = {"RabbitmqCluster", "PodMonitor", "PrometheusRule"}
EXTERNAL_SECRETS = {"fedmq-client-tls", "fedmq-rabbitmq-tls", "fedmq-rabbitmq-ca"}
"""TLS material created out of band (docs/operations.md), never rendered."""
FEDMQ_CONTAINERS = {"aggregator": "Deployment", "evaluator": "Deployment", "trainer": "StatefulSet"}
SETTINGS = {
    "aggregator": ("services.aggregator.settings", "AggregatorSettings"),
    "evaluator": ("services.evaluator.settings", "EvaluatorSettings"),
    "trainer": ("services.trainer.settings", "TrainerSettings"),
}
PREFIX = "FEDMQ_"


@cache
def _render(tree: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = "kubectl (with its built-in kustomize) is needed to render infra/k8s"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S / tree)], check=True, capture_output=True, text=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(rendered) if doc)


def _one(tree: str, kind: str, name: str) -> dict[str, Any]:
    found = [
        o for o in _render(tree) if o["kind"] == kind and o["metadata"]["name"].startswith(name)
    ]
    exact = [o for o in found if o["metadata"]["name"] == name] or found
    assert len(exact) == 1, f"{kind}/{name} in {tree}: {[o['metadata']['name'] for o in found]}"
    return exact[0]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def _workloads(tree: str) -> Iterator[dict[str, Any]]:
    yield from (o for o in _render(tree) if o["kind"] in ("Deployment", "StatefulSet"))


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = container.get("env", [])
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env in {container['name']}: {names}"
    return {e["name"]: e for e in entries}


def _container(tree: str, name: str) -> dict[str, Any]:
    [container] = _pod_spec(_one(tree, FEDMQ_CONTAINERS[name], name))["containers"]
    return cast(dict[str, Any], container)


def _volume_at(pod: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume its (single) container mounts at `path`."""
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == path]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return cast(dict[str, Any], volume)


def _secret_data(tree: str, name: str) -> dict[str, str]:
    secret = _one(tree, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def _settings_class(service: str) -> type[BaseSettings]:
    module_name, class_name = SETTINGS[service]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        pytest.skip(f"{module_name} does not exist yet: cannot check {service}'s variables")
    settings: type[BaseSettings] = getattr(module, class_name)
    return settings


@pytest.mark.parametrize("tree", TREES)
def test_every_builtin_object_is_valid_for_kubernetes(tree: str) -> None:
    objects = _render(tree)
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("tree", TREES)
def test_rabbitmq_runs_as_a_three_node_cluster_loading_the_definitions(tree: str) -> None:
    cluster = _one(tree, "RabbitmqCluster", "fedmq-rabbitmq")
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    spec = cluster["spec"]
    assert spec["replicas"] == 3
    assert spec["resources"]["requests"] and spec["resources"]["limits"]
    config = spec["rabbitmq"]["additionalConfig"]
    [path] = re.findall(r"^load_definitions\s*=\s*(\S+)", config, re.MULTILINE)
    pod = spec["override"]["statefulSet"]["spec"]["template"]["spec"]
    [rabbitmq] = [c for c in pod["containers"] if c["name"] == "rabbitmq"]
    [mount] = [m for m in rabbitmq["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    definitions = _secret_data(tree, volume["secret"]["secretName"])
    loaded = json.loads(definitions[path.rsplit("/", 1)[1]])
    queues = {q["name"]: q for q in loaded["queues"]}
    assert queues[updates_queue("pneumonia")]["arguments"]["x-queue-type"] == "quorum"


@pytest.mark.parametrize("tree", TREES)
def test_aggregator_is_one_recreated_pod_writing_checkpoints_to_a_pvc(tree: str) -> None:
    aggregator = _one(tree, "Deployment", "aggregator")
    assert aggregator["spec"]["replicas"] == 1
    assert aggregator["spec"]["strategy"] == {"type": "Recreate"}
    pod = _pod_spec(aggregator)
    env = _env(_container(tree, "aggregator"))
    volume = _volume_at(pod, env["FEDMQ_CHECKPOINT_DIR"]["value"])
    claim = _one(tree, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("tree", TREES)
def test_aggregator_reads_a_task_file_from_a_configmap_that_agrees_with_the_broker(
    tree: str, tmp_path: Path
) -> None:
    pod = _pod_spec(_one(tree, "Deployment", "aggregator"))
    task_file = Path(_env(pod["containers"][0])["FEDMQ_TASK_FILE"]["value"])
    volume = _volume_at(pod, str(task_file.parent))
    config_map = _one(tree, "ConfigMap", volume["configMap"]["name"])
    path = tmp_path / task_file.name
    path.write_text(config_map["data"][task_file.name])
    task = load_task(path)
    assert task.task_id == "pneumonia"
    assert task.queue_type == "quorum"  # the definitions' updates queue is quorum


@pytest.mark.parametrize("tree", TREES)
def test_trainers_are_a_statefulset_taking_their_site_from_the_pod_ordinal(tree: str) -> None:
    trainers = _one(tree, "StatefulSet", "trainer")
    assert trainers["spec"]["podManagementPolicy"] == "Parallel"
    service = _one(tree, "Service", trainers["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    container = _container(tree, "trainer")
    assert container["command"] == ["fedmq-site"] and container["args"] == ["trainer"]
    site = _env(container)["FEDMQ_SITE_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert site == "metadata.labels['apps.kubernetes.io/pod-index']"


def test_example_runs_eight_sites_each_with_a_provisioned_login() -> None:
    tree = "overlays/example"
    replicas = _one(tree, "StatefulSet", "trainer")["spec"]["replicas"]
    assert replicas == 8
    env = _env(_container(tree, "trainer"))
    assert int(env["FEDMQ_NUM_SITES"]["value"]) >= replicas
    pod = _pod_spec(_one(tree, "StatefulSet", "trainer"))
    volume = _volume_at(pod, env["SITE_PASSWORD_DIR"]["value"])
    passwords = _secret_data(tree, volume["secret"]["secretName"])
    assert set(passwords) == {f"trainer-site-{i}" for i in range(replicas)}


@pytest.mark.parametrize("tree", TREES)
def test_every_container_has_probes_resources_and_a_non_root_security_context(tree: str) -> None:
    for workload in _workloads(tree):
        pod = _pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert "livenessProbe" in container and "readinessProbe" in container, where
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.parametrize("tree", TREES)
def test_prometheus_scrapes_the_port_each_service_serves_metrics_on(tree: str) -> None:
    for workload in _workloads(tree):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        [container] = _pod_spec(workload)["containers"]
        port = _env(container)["FEDMQ_METRICS_PORT"]["value"]
        assert annotations["prometheus.io/port"] == port
        assert {"name": "metrics", "containerPort": int(port)} in container["ports"]
        assert container["livenessProbe"]["httpGet"]["port"] == "metrics"


@pytest.mark.parametrize("tree", TREES)
def test_every_referenced_secret_configmap_and_claim_is_rendered(tree: str) -> None:
    rendered = {(o["kind"], o["metadata"]["name"]) for o in _render(tree)}
    for workload in _workloads(tree):
        pod = _pod_spec(workload)
        for volume in pod["volumes"]:
            if "secret" in volume and volume["secret"]["secretName"] not in EXTERNAL_SECRETS:
                assert ("Secret", volume["secret"]["secretName"]) in rendered
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in rendered
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in rendered
        for entry in pod["containers"][0].get("env", []):
            if "secretKeyRef" in entry.get("valueFrom", {}):
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["key"] in _secret_data(tree, ref["name"]), ref
        assert ("ServiceAccount", pod["serviceAccountName"]) in rendered


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("service", sorted(FEDMQ_CONTAINERS))
def test_every_fedmq_variable_a_container_sets_is_a_field_of_its_settings(
    service: str, tree: str
) -> None:
    settings = _settings_class(service)
    variables = _env(_container(tree, service))
    names = {n.removeprefix(PREFIX).lower() for n in variables if n.startswith(PREFIX)}
    unknown = names - set(settings.model_fields)
    assert not unknown, f"{service} sets FEDMQ_ variables its settings ignore: {unknown}"


def _verifies(tree: str, user: str, password: str) -> bool:
    definitions = json.loads(_secret_data(tree, "fedmq-rabbitmq-definitions")["definitions.json"])
    [entry] = [u for u in definitions["users"] if u["name"] == user]
    raw = base64.b64decode(entry["password_hash"])
    return hashlib.sha256(raw[:4] + password.encode()).digest() == raw[4:]


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("service", ["aggregator", "evaluator"])
def test_service_url_secret_logs_in_as_its_own_user_on_the_cluster(service: str, tree: str) -> None:
    ref = _env(_container(tree, service))["FEDMQ_AMQP_URL"]["valueFrom"]["secretKeyRef"]
    url = urlsplit(_secret_data(tree, ref["name"])[ref["key"]])
    assert url.username == service and url.password is not None
    assert _verifies(tree, service, unquote(url.password))
    assert (url.hostname, url.path) == ("fedmq-rabbitmq", "/fedmq")
    expected = ("amqps", 5671) if tree.endswith("tls") else ("amqp", 5672)
    assert (url.scheme, url.port) == expected


def test_trainer_passwords_match_the_cluster_definitions() -> None:
    tree = "overlays/example"
    for user, password in _secret_data(tree, "fedmq-trainer-passwords").items():
        assert _verifies(tree, user, password), user


def test_example_overlay_sets_namespace_and_image_of_every_fedmq_container() -> None:
    tree = "overlays/example"
    for obj in _render(tree):
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "fedmq", obj["metadata"]["name"]
    for service in FEDMQ_CONTAINERS:
        assert _container(tree, service)["image"] == "registry.example.org/fedmq/fedmq:0.1.0"


def test_tls_overlay_verifies_the_broker_with_a_mounted_ca_and_refuses_plain_amqp() -> None:
    tree = "overlays/tls"
    cluster = _one(tree, "RabbitmqCluster", "fedmq-rabbitmq")["spec"]["tls"]
    assert cluster["disableNonTLSListeners"] is True
    assert {cluster["secretName"], cluster["caSecretName"]} <= EXTERNAL_SECRETS
    for service, kind in FEDMQ_CONTAINERS.items():
        pod = _pod_spec(_one(tree, kind, service))
        env = _env(pod["containers"][0])
        assert env["FEDMQ_ALLOW_INSECURE_REMOTE"]["value"] == "false"
        volume = _volume_at(pod, str(Path(env["FEDMQ_CA_FILE"]["value"]).parent))
        assert volume["secret"]["secretName"] == "fedmq-client-tls"
    template = _env(_container(tree, "trainer"))["SITE_AMQP_URL_TEMPLATE"]["value"]
    assert template.startswith("amqps://") and ":5671/" in template
