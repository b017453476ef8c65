"""Contract tests for deploy/k8s/: validated and cross-checked offline, not applied.

- every manifest validates against the Kubernetes JSON schemas bundled in the
  `kubernetes-validate` wheel (strict: unknown fields fail), for the oldest Kubernetes we
  claim and the newest the wheel knows;
- references resolve: ConfigMaps, Secrets and their keys, Service selectors and target
  ports, probe ports, HPA and PDB targets, `$(VAR)`s in args, the kustomization's files;
- every container is probed, has requests and limits and runs under the restricted Pod
  Security Standard (non-root as the image's user, read-only root file system with the
  writable directories on emptyDirs);
- every service of docker-compose.yml has a Deployment running the same command on the
  same port, the one the config sets; scrape annotations name that port;
- replica counts keep the rules: processors <= usage.events partitions, no CPU autoscaler
  on the Kafka workers, one reconciler and one relay at a time.

Nothing here talks to a cluster: `kubectl apply --dry-run=server`, admission webhooks and
the images themselves are not exercised.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from meterline.config import Settings, load_settings

from .deployment import (
    HTTP_SERVICES,
    PORT_SETTING,
    PROBED_SERVICES,
    SECRETS_USED,
    SERVICE_PORTS,
    check_meterline_argv,
    configured_ports,
    setting,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
SECRETS_TEMPLATE = "secrets.example.yaml"
# Oldest Kubernetes these manifests are meant for (PDB policy/v1, HPA autoscaling/v2 and
# Job TTLs are all GA well before it), and the newest the validator's wheel bundles.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# Kafka workers that keep partition or schedule state: never scaled on CPU.
NO_CPU_AUTOSCALING = {"processor", "stripe-sink", "relay", "reconcile", "ledger-consumer"}
# Exactly one at a time, also during a rollout.
SINGLETONS = {"reconcile": "two reconcilers would race to repair the same gaps",
              "relay": "one relay keeps each customer's balance changes in order"}
# The bridge only talks to Kafka; everything else reads or writes Postgres.
NO_DATABASE = {"webhook-bridge"}


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


FILES: dict[str, list[dict[str, Any]]] = {
    p.name: _load(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
}
APPLIED = [doc for name in KUSTOMIZATION["resources"] for doc in FILES[name]]
ALL = [doc for docs in FILES.values() for doc in docs]


def of_kind(kind: str, docs: list[dict[str, Any]] = APPLIED) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


DEPLOYMENTS = of_kind("Deployment")
COMPONENTS = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in DEPLOYMENTS.values()}
JOBS = of_kind("Job")
CONFIGMAPS = of_kind("ConfigMap")
SECRETS = of_kind("Secret", FILES[SECRETS_TEMPLATE])
SERVICES = of_kind("Service")
PDBS = of_kind("PodDisruptionBudget")
HPAS = of_kind("HorizontalPodAutoscaler")
(NAMESPACE,) = of_kind("Namespace")
NAMESPACE_LABELS: dict[str, str] = of_kind("Namespace")[NAMESPACE]["metadata"]["labels"]


def pod_specs() -> dict[str, dict[str, Any]]:
    """Workload name -> its pod spec (Deployments and Jobs)."""
    return {name: w["spec"]["template"]["spec"] for name, w in {**DEPLOYMENTS, **JOBS}.items()}


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def all_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(f"{name}/{c['name']}", pod, c) for name, pod in pod_specs().items() for c in containers(pod)]


def main_container(component: str) -> dict[str, Any]:
    (container,) = COMPONENTS[component]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would build it from the shipped files
    (secret values from the template)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(CONFIGMAPS[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif ref := var["valueFrom"].get("secretKeyRef"):
            env[var["name"]] = SECRETS[ref["name"]]["stringData"][ref["key"]]
        elif ref := var["valueFrom"].get("configMapKeyRef"):
            env[var["name"]] = CONFIGMAPS[ref["name"]]["data"][ref["key"]]
        else:
            env[var["name"]] = "from-the-downward-api"
    return env


def config_text(component: str) -> str:
    """The config file the container reads: the ConfigMap key mounted where METERLINE_CONFIG points."""
    config = PurePosixPath(env_of(main_container(component))["METERLINE_CONFIG"])
    mounts = [m for m in main_container(component)["volumeMounts"]
              if PurePosixPath(m["mountPath"]) == config.parent]
    assert len(mounts) == 1, f"{component}: nothing (or several things) mounted at {config.parent}"
    pod = COMPONENTS[component]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    data = CONFIGMAPS[volume["configMap"]["name"]]["data"]
    assert config.name in data, f"{component}: ConfigMap has no key {config.name}"
    return str(data[config.name])


def settings_of(component: str) -> Settings:
    """The settings the container loads: its environment plus its mounted config file."""
    env = env_of(main_container(component))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "meterline.yaml"
        path.write_text(config_text(component))
        with mock.patch.dict(os.environ, {k: v for k, v in env.items() if k != "METERLINE_CONFIG"},
                             clear=True):
            return load_settings(path)


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (`250m`, `1`, `512Mi`, `1Gi`) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert m and (m.group(2) in units or not m.group(2)), f"bad quantity {value!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def image_user() -> tuple[int, int]:
    """The uid:gid of the image's last USER instruction."""
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert users, "deploy/Dockerfile has no numeric USER"
    return int(users[-1][0]), int(users[-1][1])


def image_workdir() -> str:
    return str(re.findall(r"^WORKDIR\s+(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE)[-1])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return services


# --- schema ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", ALL, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates_against_the_kubernetes_schema(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


DELETE = object()


@pytest.mark.parametrize(("path", "value"), [
    (("spec", "replicas"), "two"),                                          # wrong type
    (("spec", "template", "spec", "containers", 0, "livenessprobe"), {}),  # unknown field (strict)
    (("spec", "template", "spec", "containers", 0, "name"), DELETE),       # required field
])
def test_the_validator_rejects_broken_manifests(path: tuple[Any, ...], value: Any) -> None:
    """The check above can fail: the schemas load offline and strict mode is on. (Value
    ranges such as port numbers are the API server's job: the schemas do not hold them.)"""
    doc = yaml.safe_load(yaml.safe_dump(DEPLOYMENTS["meterline-processor"]))
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


# --- kustomization and namespace --------------------------------------------------------


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    resources = KUSTOMIZATION["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == set(FILES) - {SECRETS_TEMPLATE}
    assert SECRETS_TEMPLATE in FILES, "the Secret template documents what to create"
    assert KUSTOMIZATION["namespace"] == NAMESPACE


def test_every_resource_is_in_the_namespace_and_uniquely_named() -> None:
    seen = set()
    for doc in ALL:
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{doc['kind']}/{meta['name']}"
        assert (doc["kind"], meta["name"]) not in seen, f"two {doc['kind']}s named {meta['name']}"
        seen.add((doc["kind"], meta["name"]))
        assert meta["labels"]["app.kubernetes.io/name"] == "meterline"


def test_images_are_the_kustomized_meterline_image() -> None:
    (image,) = [i for i in KUSTOMIZATION["images"] if i["name"] == "meterline"]
    tag = image["newTag"]
    assert tag and tag != "latest"
    for where, _, container in all_containers():
        assert container["image"] == f"meterline:{tag}", where
        assert container.get("imagePullPolicy") == "IfNotPresent", where


# --- services, commands and ports --------------------------------------------------------


def test_every_compose_service_has_a_deployment_running_the_same_command() -> None:
    compose = compose_services()
    expected = set(SERVICE_PORTS) - {"stripe-emulator"}  # dev-only: Kubernetes bills Stripe
    assert set(COMPONENTS) == expected
    for component in COMPONENTS:
        args = list(main_container(component)["args"])
        if "--worker-id" in args:  # the pod name, recorded with partition claims
            i = args.index("--worker-id")
            assert args[i + 1] == "$(POD_NAME)"
            del args[i:i + 2]
        assert args == compose[component]["command"], component
        assert main_container(component)["name"] == component


@pytest.mark.parametrize("where", [w for w, _, _ in all_containers()])
def test_container_runs_a_real_command(where: str) -> None:
    (container,) = [c for w, _, c in all_containers() if w == where]
    assert "command" not in container, "keep the image's `meterline` entrypoint"
    argv = container["args"]
    check_meterline_argv(where, [re.sub(r"\$\((\w+)\)", r"\1", a) for a in argv])
    defined = {v["name"] for v in container.get("env", [])}
    for var in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        assert var in defined, f"{where}: $({var}) is not defined in env"


def test_the_init_job_migrates_then_creates_topics() -> None:
    (job,) = JOBS.values()
    pod = job["spec"]["template"]["spec"]
    assert [c["args"] for c in pod["initContainers"]] == [["migrate"]]
    assert [c["args"] for c in pod["containers"]] == [["topics"]]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    assert job["spec"].get("ttlSecondsAfterFinished")
    assert compose_services()["init"]["command"] == ["meterline migrate && meterline topics"]


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_container_port_is_the_configured_one(component: str) -> None:
    container = main_container(component)
    port, health_path = SERVICE_PORTS[component]
    name = "http" if component in HTTP_SERVICES else "metrics"
    assert container["ports"] == [{"name": name, "containerPort": port, "protocol": "TCP"}]
    assert setting(settings_of(component), PORT_SETTING[component]) == port


def test_every_configured_port_is_a_container_port() -> None:
    ports = configured_ports(settings_of("processor"))
    served = {p["containerPort"] for d in COMPONENTS for p in main_container(d)["ports"]}
    assert ports and {name: p for name, p in ports.items() if p not in served} == {}


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_probes(component: str) -> None:
    container = main_container(component)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{component}: no {probe}"
        get = container[probe]["httpGet"]
        assert get["port"] in ports or get["port"] in ports.values(), f"{component}.{probe}: unknown port"
        paths[probe] = get["path"]
        assert container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"]
    if component in PROBED_SERVICES:
        assert paths == {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    else:
        assert set(paths.values()) == {"/metrics"}
    # A slow scrape under load must not restart a busy worker: a minute of failures first.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_prometheus_annotations_name_the_metrics_port(component: str) -> None:
    annotations = COMPONENTS[component]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == SERVICE_PORTS[component][0]


# --- config and secrets -------------------------------------------------------------------


def test_configmap_config_is_the_compose_config() -> None:
    """deploy/k8s/config.yaml carries deploy/meterline.yaml; only the connection settings,
    which both take from the environment, may differ."""
    (text,) = {config_text(c) for c in COMPONENTS}
    ours = yaml.safe_load(text)
    compose = yaml.safe_load((ROOT / "deploy" / "meterline.yaml").read_text())
    for config in (ours, compose):
        config.pop("database_url", None)
        config.get("kafka", {}).pop("bootstrap_servers", None)
    assert ours == compose, "deploy/k8s/config.yaml and deploy/meterline.yaml disagree: keep them in step"


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_config_loads_with_the_pods_environment(component: str) -> None:
    settings = settings_of(component)
    env = env_of(main_container(component))
    assert settings.kafka.bootstrap_servers == env["KAFKA_BOOTSTRAP_SERVERS"]
    assert settings.meters, "no meters: every event would be dead-lettered"
    if component not in NO_DATABASE:
        assert settings.database_url == env["DATABASE_URL"]


def test_every_reference_resolves() -> None:
    for where, pod, container in all_containers():
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in CONFIGMAPS, where
        for var in container.get("env", []):
            if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                assert ref["key"] in SECRETS[ref["name"]]["stringData"], f"{where}: {ref}"
                assert not ref.get("optional"), f"{where}: a missing secret must stop the pod"
            if ref := var.get("valueFrom", {}).get("configMapKeyRef"):
                assert ref["key"] in CONFIGMAPS[ref["name"]]["data"], f"{where}: {ref}"
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                assert volume["configMap"]["name"] in CONFIGMAPS, where
                assert mount.get("readOnly"), f"{where}: config mounted writable"


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_each_service_gets_only_the_secrets_it_uses(component: str) -> None:
    container = main_container(component)
    secret_env = {v["name"] for v in container.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
    wanted = SECRETS_USED.get(component, set()) | (set() if component in NO_DATABASE else {"DATABASE_URL"})
    assert secret_env == wanted
    assert not any("secretRef" in s for s in container.get("envFrom", [])), "whole Secrets as env"


def test_the_secret_template_holds_placeholders_only() -> None:
    for name, secret in SECRETS.items():
        assert secret["type"] == "Opaque" and "data" not in secret, name
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value, f"{name}.{key} is not a placeholder"
    text = (K8S / SECRETS_TEMPLATE).read_text()
    assert not re.search(r"\b(sk|rk)_(live|test)_(?!REPLACE_ME)\w", text), "a Stripe key in the template"
    for doc in APPLIED:
        assert doc["kind"] != "Secret", "Secrets are created by the operator, not applied from here"


# --- security ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [w for w, _, _ in all_containers()])
def test_restricted_pod_security(where: str) -> None:
    (pod, container) = [(p, c) for w, p, c in all_containers() if w == where][0]
    uid, gid = image_user()
    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert (pod_sc["runAsUser"], pod_sc["runAsGroup"]) == (uid, gid), "run as the image's user"
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert NAMESPACE_LABELS.get("pod-security.kubernetes.io/enforce") == "restricted"


@pytest.mark.parametrize("where", [w for w, _, _ in all_containers()])
def test_writable_directories_are_volumes(where: str) -> None:
    """Root file systems are read-only: /tmp, and for the long-running services the image's
    working directory (the processor's Faust data dir, the reconciler's reports), are
    emptyDir volumes."""
    (pod, container) = [(p, c) for w, p, c in all_containers() if w == where][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}
    needed = {"/tmp"} | ({image_workdir()} if where.split("/")[0] in DEPLOYMENTS else set())
    for path in needed:
        assert path in writable, f"{where}: {path} is not writable"
        assert "emptyDir" in writable[path] or "persistentVolumeClaim" in writable[path], where
        assert writable[path].get("emptyDir", {}).get("sizeLimit"), f"{where}: unbounded emptyDir"


@pytest.mark.parametrize("where", [w for w, _, _ in all_containers()])
def test_resources_are_requested_and_limited(where: str) -> None:
    (container,) = [c for w, _, c in all_containers() if w == where]
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        request, limit = resources["requests"][kind], resources["limits"][kind]
        assert quantity(request) <= quantity(limit), f"{where}: {kind} request above limit"


# --- scaling and availability --------------------------------------------------------------


def test_processor_replicas_stay_within_the_usage_partitions() -> None:
    partitions = settings_of("processor").kafka.partitions
    assert 1 <= COMPONENTS["processor"]["spec"]["replicas"] <= partitions
    assert 1 <= COMPONENTS["stripe-sink"]["spec"]["replicas"] <= partitions  # usage.aggregates


def test_autoscalers_target_stateless_http_services_only() -> None:
    targets = set()
    for name, hpa in HPAS.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in DEPLOYMENTS, name
        component = DEPLOYMENTS[ref["name"]]["metadata"]["labels"]["app.kubernetes.io/component"]
        assert component not in NO_CPU_AUTOSCALING, f"{name}: partitions, not CPU, bound {component}"
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        targets.add(component)
    assert targets == set(HTTP_SERVICES)
    for component, deployment in COMPONENTS.items():
        # An autoscaled Deployment leaves replicas to the HPA (a re-apply would reset them).
        assert ("replicas" in deployment["spec"]) != (component in targets), component


@pytest.mark.parametrize("component", sorted(SINGLETONS))
def test_singletons_never_run_twice(component: str) -> None:
    spec = COMPONENTS[component]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", SINGLETONS[component]


def test_disruption_budgets_cover_the_replicated_services() -> None:
    covered = {}
    for name, pdb in PDBS.items():
        hits = [c for c, d in COMPONENTS.items()
                if matches(pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(hits) == 1, f"PDB {name} selects {hits}"
        assert pdb["spec"].get("maxUnavailable") == 1, name
        covered[hits[0]] = pdb
    replicated = {c for c, d in COMPONENTS.items() if d["spec"].get("replicas", 2) > 1}
    assert set(covered) == replicated, "a PDB on a single replica blocks node drains"


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_service_selects_its_deployment_on_a_declared_port(component: str) -> None:
    deployment = COMPONENTS[component]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    mine = [s for s in SERVICES.values() if matches(s["spec"]["selector"], labels)]
    assert len(mine) == 1, f"{component}: {len(mine)} Services"
    (service,) = mine
    ports = {p["name"]: p["containerPort"] for p in main_container(component)["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
    others = [c for c, d in COMPONENTS.items()
              if c != component and matches(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
    assert not others, f"{service['metadata']['name']} also selects {others}"
    if component in HTTP_SERVICES:
        assert service["spec"]["type"] == "ClusterIP" and service["spec"].get("clusterIP") != "None"
    else:  # workers: headless, one scrape target per pod
        assert service["spec"]["clusterIP"] == "None"


# --- kustomize, when kubectl is around ----------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (optional)")
def test_kustomize_renders_the_same_resources() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out) if d}
    assert rendered == {(d["kind"], d["metadata"]["name"]) for d in APPLIED}
