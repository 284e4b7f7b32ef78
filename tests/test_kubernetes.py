"""deploy/kubernetes/ without a cluster (none runs here): every manifest is validated against the
Kubernetes OpenAPI schemas that kubernetes-validate bundles (offline, strict: an unknown field is
an error), then cross-checked against the gateway: its settings, its probes, its shutdown order,
its routing file, and the compose file's stop grace."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
#: the oldest release these manifests are meant for, and the newest the validator knows
VERSIONS = ("1.29.0", "1.37.0")
GATEWAY_LABELS = {"app.kubernetes.io/name": "interlock", "app.kubernetes.io/component": "gateway"}


def manifests(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in manifests(path.name)
    ]


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for _, d in all_manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def gateway_container() -> dict[str, Any]:
    (container,) = one("Deployment", "interlock")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_follows_the_kubernetes_schemas(version: str) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed (the test extra has it)")
    import kubernetes_validate

    found = all_manifests()
    assert {d["kind"] for _, d in found} >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
    }
    for name, doc in found:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message}"
            )


def test_a_broken_manifest_is_caught() -> None:
    """The validator is not a rubber stamp: a misspelt field and a wrong type both fail."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed (the test extra has it)")
    import kubernetes_validate

    deployment = one("Deployment", "interlock")
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"tcpSocket": {"port": 1}}
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "three"
    for doc in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_alternatives() -> None:
    (kustomization,) = manifests("kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # the Secret is the user's to create; the in-flight autoscaler replaces hpa.yaml when used
    assert listed == on_disk - {"secret.example.yaml", "hpa-inflight.yaml"}
    assert [i["name"] for i in kustomization["images"]] == [gateway_container()["image"]]


def test_the_deployment_runs_the_gateway_as_its_settings_expect() -> None:
    container = gateway_container()
    env = env_of(container)
    known = {f"INTERLOCK_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("INTERLOCK_")} <= known
    port = int(env["INTERLOCK_PORT"])
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert env["INTERLOCK_HOST"] == "0.0.0.0"
    # each pod is a replica named after itself in Redis
    assert env["INTERLOCK_REPLICA"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # probes: liveness never waits for models, readiness does
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    # the routing file is the mounted ConfigMap, mounted whole so that updates reach it (and reload)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "routing")
    assert "subPath" not in mount
    assert env["INTERLOCK_CONFIG"] == f"{mount['mountPath']}/config.yaml"
    volumes = one("Deployment", "interlock")["spec"]["template"]["spec"]["volumes"]
    routing = next(v for v in volumes if v["name"] == "routing")
    assert routing["configMap"]["name"] == "interlock-routing"
    assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["interlock-secrets"]
    assert one("Secret", "interlock-secrets")["type"] == "Opaque"


def test_the_stop_order_fits_in_the_grace_period() -> None:
    """preStop (the endpoints drop the pod) + the gateway's own delay + its graceful shutdown must
    end before the kubelet's SIGKILL; the compose file's stop grace has the same budget."""
    spec = one("Deployment", "interlock")["spec"]["template"]["spec"]
    container = gateway_container()
    env = env_of(container)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5  # kube-proxy and ingress controllers need a few seconds to stop routing
    delay = float(env.get("INTERLOCK_SHUTDOWN_DELAY_S", Settings.model_fields["shutdown_delay_s"].default))
    graceful = float(env["INTERLOCK_GRACEFUL_SHUTDOWN_S"])
    assert pre_stop + delay + graceful < spec["terminationGracePeriodSeconds"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["interlock"]
    compose_env = compose["environment"]
    compose_delay = float(compose_env.get("INTERLOCK_SHUTDOWN_DELAY_S", Settings().shutdown_delay_s))
    compose_graceful = float(compose_env.get("INTERLOCK_GRACEFUL_SHUTDOWN_S", Settings().graceful_shutdown_s))
    grace = re.fullmatch(r"(\d+)s", compose["stop_grace_period"])
    assert grace, compose["stop_grace_period"]
    assert compose_delay + compose_graceful < int(grace.group(1))


def test_service_pdb_and_autoscalers_select_the_gateway_pods() -> None:
    deployment = one("Deployment", "interlock")
    assert deployment["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    assert GATEWAY_LABELS.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    service = one("Service", "interlock")
    assert service["spec"]["selector"] == GATEWAY_LABELS
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one("PodDisruptionBudget", "interlock")
    assert pdb["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    # a rolling update never goes below the replicas in service, and the budget lets drains through
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for name in ("hpa.yaml", "hpa-inflight.yaml"):
        (hpa,) = manifests(name)
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "interlock",
        }
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    (cpu,) = manifests("hpa.yaml")[0]["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    assert gateway_container()["resources"]["requests"]["cpu"]  # utilization is a share of the request
    (inflight, _) = manifests("hpa-inflight.yaml")[0]["spec"]["metrics"]
    assert inflight["pods"]["metric"]["name"] == "interlock_in_flight"


def test_the_gateway_reaches_the_redis_service() -> None:
    url = env_of(gateway_container())["INTERLOCK_REDIS_URL"]
    found = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", url)
    assert found, url
    service = one("Service", found.group(1))
    assert int(found.group(2)) == service["spec"]["ports"][0]["port"]
    redis = one("Deployment", found.group(1))
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert "--save" in container["args"] and "--appendonly" in container["args"]


def test_the_configmaps_routing_file_is_one_the_gateway_serves() -> None:
    text = one("ConfigMap", "interlock-routing")["data"]["config.yaml"]
    env = {"CLIENT_KEY_SHA256": "ab" * 32, "OPENAI_API_KEY": "sk-test"}
    config = parse_config(yaml.safe_load(text), "configmap.yaml", env)
    assert {"smollm2", "chat"} <= set(config.models)
    assert config.auth.keys  # the pods listen beyond loopback: never without client keys
    secret_keys = set(one("Secret", "interlock-secrets")["stringData"])
    assert set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text)) <= secret_keys  # no default: from the Secret
