"""The compose stack, checked without a Docker engine (none runs here): its profiles, the files it
mounts, the routing file it serves against the services it names, the stop grace period, and the
Grafana dashboard's PromQL against the metric names a running gateway exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load_config
from gateway.metrics_state import _POOL_GAUGES
from gateway.settings import Settings
from tests.conftest import run_gateway
from tests.fakes import FakeUpstream, openai_backend
from tests.vllm_sim import VllmSim

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-+]([^}]*))?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolated(value: str, env: dict[str, str] | None = None) -> str:
    """``value`` as compose reads it with ``env`` set (else each variable's default)."""
    env = env or {}
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)


def services_of(profile: str | None) -> set[str]:
    """The services ``docker compose [--profile P] up`` starts."""
    return {
        name
        for name, service in compose()["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def test_up_alone_stays_small_and_each_profile_adds_its_part() -> None:
    assert services_of(None) == {"interlock", "redis"}
    assert services_of("gpu") == {"interlock", "redis", "vllm"}
    assert services_of("ollama") == {"interlock", "redis", "ollama", "ollama-pull"}
    assert services_of("metrics") == {"interlock", "redis", "prometheus", "grafana"}
    services = compose()["services"]
    vllm = services["vllm"]
    assert interpolated(vllm["image"]).startswith("vllm/vllm-openai:")
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert interpolated(services["ollama"]["image"]).startswith("ollama/ollama:")
    # the model Ollama pulls is the one the routing file asks for (one anchor in the compose file)
    pulled = services["ollama-pull"]["entrypoint"][-1]
    assert pulled == services["interlock"]["environment"]["OLLAMA_MODEL"]
    model_flag = vllm["command"].index("--model")
    assert vllm["command"][model_flag + 1] == services["interlock"]["environment"]["VLLM_MODEL"]


def test_every_file_the_compose_mounts_exists() -> None:
    mounted = 0
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = interpolated(volume).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{source} is mounted but not in the repository"
                mounted += 1
    assert mounted >= 4


def served_routing() -> Path:
    source = interpolated(compose()["services"]["interlock"]["volumes"][0]).split(":")[0]
    return ROOT / source


def test_the_served_routing_file_names_only_services_ports_and_variables_that_exist() -> None:
    services = compose()["services"]
    env = {k: str(v) for k, v in services["interlock"]["environment"].items()}
    text = "\n".join(line.split("#")[0] for line in served_routing().read_text().splitlines())
    named = {m.group(1) for m in _VAR.finditer(text)}
    assert named, "the routing file reads its URLs and models from the environment"
    # every variable it reads is set for the gateway by the compose file
    assert named <= set(env), named - set(env)
    resolved = {k: interpolated(v) for k, v in env.items()}
    config = load_config(served_routing(), env={**resolved})
    hosts = []
    for name, backend in config.backends.items():
        urls = getattr(backend, "endpoints", None) or [getattr(backend, "url", None)]
        for url in filter(None, urls):
            host, port = re.match(r"https?://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
            assert host in services, f"backend {name}: {host} is no compose service"
            assert port in [str(p) for p in services[host].get("expose", [])], f"{host} exposes no {port}"
            hosts.append(host)
    assert sorted(hosts) == ["ollama", "vllm"]
    # the gateway's INTERLOCK_* variables are settings it has
    known = {f"INTERLOCK_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("INTERLOCK_")} <= known


def _seconds(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_the_stop_grace_period_covers_the_shutdown_delay_and_grace() -> None:
    gateway = compose()["services"]["interlock"]
    env = gateway["environment"]
    defaults = Settings()
    delay = float(env.get("INTERLOCK_SHUTDOWN_DELAY_S", defaults.shutdown_delay_s))
    grace = float(env.get("INTERLOCK_GRACEFUL_SHUTDOWN_S", defaults.graceful_shutdown_s))
    # docker kills the container this long after SIGTERM; the gateway needs delay + grace, and a
    # moment to close backends and exit
    assert _seconds(gateway["stop_grace_period"]) >= delay + grace + 2


def test_prometheus_scrapes_the_gateway_from_loopback_and_grafana_has_its_data_source() -> None:
    services = compose()["services"]
    assert services["prometheus"]["network_mode"] == "service:interlock"
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = services["interlock"]["ports"][0].rsplit(":", 1)[1]
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://interlock:9090"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/interlock.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


#: PromQL's own words, which look like metric names
_PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "max", "count", "changes", "le", "without",
    "label_values", "and", "or", "unless", "on", "ignoring", "bool", "offset",
}  # fmt: skip


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/interlock.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    names = set()
    for expr in exprs:
        stripped = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
        stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # ranges
        stripped = re.sub(r"\bby \([^)]*\)", "", stripped)  # grouping labels
        stripped = re.sub(r"label_values\(([a-z_:]+), [a-z_]+\)", r"\1", stripped)
        for word in re.findall(r"(?<![0-9.])[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
            if word not in _PROMQL_WORDS and not word.startswith("__"):
                names.add(word)
    return names


def test_the_dashboard_queries_only_metrics_the_gateway_exports(tmp_path: Path) -> None:
    with FakeUpstream() as up, VllmSim() as sim:
        routing = {
            "backends": {
                "a": openai_backend(up.base_url, "ok"),
                "pool": {
                    "kind": "vllm",
                    "endpoints": [sim.base_url],
                    "model": "smollm2",
                    "scrape_interval_s": 0.05,
                },
            },
            "models": {"chat": {"targets": ["a"], "cache": {"ttl_s": 60}}, "pooled": {"targets": ["pool"]}},
            "resilience": {"health_check": {"interval_s": 0}},
        }
        path = tmp_path / "routing.yaml"
        path.write_text(json.dumps(routing))
        with run_gateway(path, reload_watch=False, redis_url="redis://127.0.0.1:6379/12") as url:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            assert httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
            body = {**body, "stream": False, "temperature": 0}  # cacheable: Redis is called
            assert httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
            body["model"] = "pooled"
            assert httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
            assert httpx.post(url + "/admin/reload", timeout=10).status_code == 200
            deadline = time.monotonic() + 15
            while True:
                text = httpx.get(url + "/metrics", timeout=10).text
                if "interlock_config_replicas" in text and "interlock_vllm_endpoint_running" in text:
                    break
                assert time.monotonic() < deadline, "the pool's and the peers' figures never appeared"
                time.sleep(0.1)
    exported = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")
        if family.type == "histogram":
            exported.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    assert {name for name, _ in _POOL_GAUGES.values()} <= exported
    used = dashboard_metric_names()
    assert len(used) >= 20
    assert used <= exported, f"the dashboard queries metrics the gateway does not export: {used - exported}"
