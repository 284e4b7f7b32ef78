"""``GET /metrics`` and the access log, through the real gateway in front of fake upstreams.

FakeUpstream picks its behaviour by the upstream model name (``ok``, ``error500``, ``cut``...), so
each backend below is one behaviour; ChaosUpstream's mode flips to open a circuit. Every figure is
read back from the Prometheus text, parsed by prometheus-client's own parser.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_gateway
from tests.fakes import UPSTREAM_KEY, ChaosUpstream, FakeUpstream, openai_backend

MESSAGES = [{"role": "user", "content": "Say hello."}]
FAST = {
    "breaker": {"consecutive_failures": 50},
    "health_check": {"interval_s": 0},
    "retry": {"backoff_initial_s": 0.001, "backoff_max_s": 0.01},
}


def config(up: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "backends": {
            "a": openai_backend(up.base_url, "ok", price={"input_per_mtok": 1, "output_per_mtok": 2}),
            "bad": openai_backend(up.base_url, "error500"),
            "cutter": openai_backend(up.base_url, "cut"),
            "forever": openai_backend(up.base_url, "endless", total=60),
        },
        "models": {
            "chat": {"targets": ["a"]},
            "broken": {"targets": ["bad"], "attempts": 1},
            "rescued": {"targets": ["bad"], "fallback": ["a"]},
            "cut": {"targets": ["cutter"]},
            "endless": {"targets": ["forever"]},
        },
        "resilience": FAST,
        **extra,
    }


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(url: str, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of a scrape: (name, labels) → value."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def chat(url: str, model: str, stream: bool = False, **headers: str) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def test_counts_by_route_backend_status_and_stream(up: FakeUpstream) -> None:
    with run_gateway(config(up)) as url:
        for _ in range(3):
            assert chat(url, "chat").status_code == 200
        for _ in range(2):
            response = chat(url, "chat", stream=True)
            assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
        for name in ("junk-1", "junk-2"):
            assert chat(url, name).status_code == 404
        assert httpx.post(url + "/v1/chat/completions", content=b"{", timeout=10).status_code == 400
        assert chat(url, "broken").status_code == 502
        assert chat(url, "rescued").status_code == 200
        found = samples(url)

    requests = "interlock_requests_total"
    assert value(found, requests, route="chat", backend="a", status_class="2xx", stream="false") == 3
    assert value(found, requests, route="chat", backend="a", status_class="2xx", stream="true") == 2
    assert value(found, requests, route="other", backend="none", status_class="4xx", stream="false") == 3
    assert value(found, requests, route="broken", backend="bad", status_class="5xx", stream="false") == 1
    assert value(found, requests, route="rescued", backend="a", status_class="2xx", stream="false") == 1
    count = "interlock_request_duration_seconds_count"
    assert value(found, count, route="chat", backend="a", status_class="2xx", stream="true") == 2
    # TTFT and time per output token: streams only
    assert value(found, "interlock_time_to_first_token_seconds_count", route="chat", backend="a") == 2
    assert (
        value(found, "interlock_time_to_first_token_seconds_bucket", route="chat", backend="a", le="+Inf")
        == 2
    )
    assert value(found, "interlock_time_per_output_token_seconds_count", route="chat", backend="a") == 2
    # usage 5 / 3 per JSON reply (the fake's), and counted events for its streams (no usage chunk)
    assert value(found, "interlock_tokens_total", route="chat", backend="a", type="input") == 15
    assert value(found, "interlock_tokens_total", route="chat", backend="a", type="output") == 3 * 3 + 2 * 2
    assert value(found, "interlock_cost_usd_total", route="chat", backend="a") == pytest.approx(
        3 * (5 * 1 + 3 * 2) / 1e6 + 2 * (2 * 2) / 1e6
    )
    assert value(found, "interlock_attempts_total", backend="a", outcome="ok") == 6
    assert value(found, "interlock_attempts_total", backend="bad", outcome="failed") == 2
    assert value(found, "interlock_fallbacks_total", route="rescued") == 1
    assert value(found, "interlock_retries_total", route="rescued", reason="upstream_5xx") == 1
    # the gateway's own time: answered non-streamed requests (3 chat + 1 rescued)
    assert value(found, "interlock_gateway_overhead_seconds_count") == 4
    assert (
        0
        < value(found, "interlock_gateway_overhead_seconds_sum")
        < value(
            found,
            "interlock_request_duration_seconds_sum",
            route="chat",
            backend="a",
            status_class="2xx",
            stream="false",
        )
    )
    assert value(found, "interlock_breaker_state", backend="a") == 0
    assert value(found, "interlock_backend_in_flight", backend="a") == 0
    assert [labels for name, labels in found if name == "interlock_config_info"] != []


def test_a_stream_cut_by_its_upstream_counts_as_an_error(up: FakeUpstream) -> None:
    with run_gateway(config(up)) as url:
        response = chat(url, "cut", stream=True)
        assert response.status_code == 200 and '"error"' in response.text
        found = samples(url)
    assert (
        value(
            found,
            "interlock_requests_total",
            route="cut",
            backend="cutter",
            status_class="5xx",
            stream="true",
        )
        == 1
    )
    assert value(found, "interlock_attempts_total", backend="cutter", outcome="failed") == 1
    # a broken stream is no sample of a healthy first token
    assert value(found, "interlock_time_to_first_token_seconds_count", route="cut", backend="cutter") == 0


def test_the_breaker_gauge_reads_open_once_the_circuit_opens() -> None:
    with ChaosUpstream(mode="error500") as chaos:
        cfg = {
            "backends": {"flaky": openai_backend(chaos.base_url)},
            "models": {"chat": {"targets": ["flaky"], "attempts": 1}},
            "resilience": {**FAST, "breaker": {"consecutive_failures": 3, "cooldown_s": 60}},
        }
        with run_gateway(cfg) as url:
            assert value(samples(url), "interlock_breaker_state", backend="flaky") == 0
            for _ in range(3):
                assert chat(url, "chat").status_code == 502
            assert value(samples(url), "interlock_breaker_state", backend="flaky") == 2


def _pipelined(url: str, bodies: list[bytes]) -> None:
    """POSTs ``bodies`` on one keep-alive connection, pipelined in batches: 10,000 requests through
    httpx would spend most of the test in the client."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for start in range(0, len(bodies), 200):
            batch = bodies[start : start + 200]
            sock.sendall(
                b"".join(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                    b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(b), b)
                    for b in batch
                )
            )
            seen, buffer = 0, b""
            while seen < len(batch):
                chunk = sock.recv(1 << 16)
                assert chunk, "the gateway closed the connection"
                buffer += chunk
                seen = buffer.count(b"HTTP/1.1 404")
            assert buffer.count(b"HTTP/1.1 ") == len(batch)


def test_ten_thousand_junk_model_names_do_not_grow_the_metrics(up: FakeUpstream) -> None:
    with run_gateway(config(up)) as url:
        assert chat(url, "chat").status_code == 200
        assert chat(url, "junk-warm").status_code == 404  # the `other` series exists from here on
        before = httpx.get(url + "/metrics", timeout=10).text
        junk = b'{"model":"junk-%d-%s","messages":[{"role":"user","content":"x"}]}'
        _pipelined(url, [junk % (i, b"z" * 40) for i in range(10_000)])
        after = httpx.get(url + "/metrics", timeout=10).text
    assert len(after) < len(before) * 1.01, (len(before), len(after))  # ~0.5% here: digits
    assert "junk" not in after
    series = [line.rsplit(" ", 1)[0] for line in after.splitlines() if not line.startswith("#")]
    assert series == [line.rsplit(" ", 1)[0] for line in before.splitlines() if not line.startswith("#")]
    found = {
        s.name: s
        for f in text_string_to_metric_families(after)
        for s in f.samples
        if s.name == "interlock_requests_total" and s.labels["route"] == "other"
    }
    assert found["interlock_requests_total"].value == 10_001


def test_a_scrape_under_load_parses(up: FakeUpstream) -> None:
    with run_gateway(config(up)) as url:
        stop = threading.Event()
        failures: list[str] = []

        def load(stream: bool) -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    body = {"model": "chat", "messages": MESSAGES, "stream": stream}
                    response = client.post(url + "/v1/chat/completions", json=body)
                    if response.status_code != 200:
                        failures.append(response.text)

        threads = [threading.Thread(target=load, args=(i % 2 == 0,)) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(15):
                names = {f.name for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
                assert {
                    "interlock_requests",
                    "interlock_request_duration_seconds",
                    "interlock_breaker_state",
                    "interlock_backend_in_flight",
                    "process_cpu_seconds",
                } <= names
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        assert not failures


CLIENT_KEY, ADMIN_KEY = "sk-metrics-client-secret-0001", "sk-metrics-admin-secret-0002"
KEYS = [
    {"name": "team-a", "sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest()},
    {"name": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True},
]


def test_with_keys_metrics_need_an_admin_key(up: FakeUpstream) -> None:
    with run_gateway(config(up, auth={"keys": KEYS})) as url:
        assert httpx.get(url + "/metrics").status_code == 401
        bearer = {"authorization": f"Bearer {CLIENT_KEY}"}
        assert httpx.get(url + "/metrics", headers=bearer).status_code == 403
        assert (
            value(
                samples(url, {"authorization": f"Bearer {ADMIN_KEY}"}), "interlock_breaker_state", backend="a"
            )
            == 0
        )


def test_metrics_can_be_turned_off(up: FakeUpstream) -> None:
    with run_gateway(config(up), metrics=False) as url:
        assert chat(url, "chat").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 404


FIELDS = {
    "time",
    "request_id",
    "trace_id",
    "endpoint",
    "route",
    "model",
    "backend",
    "attempts",
    "reason",
    "cache",
    "status",
    "stream",
    "stream_error",
    "ttft_ms",
    "duration_ms",
    "upstream_ms",
    "overhead_ms",
    "tokens_in",
    "tokens_out",
    "cached_tokens",
    "cost_usd",
    "finish_reason",
    "error",
    "disconnect",
    "key",
}


def test_the_access_log_has_one_json_line_per_request_and_no_secrets(
    up: FakeUpstream, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    secret_prompt = "my-private-prompt-7f3a9c"
    bearer = {"authorization": f"Bearer {CLIENT_KEY}"}
    with run_gateway(config(up, auth={"keys": KEYS}), access_log=str(log)) as url:
        body = {"model": "chat", "messages": [{"role": "user", "content": secret_prompt}]}
        ok = httpx.post(
            url + "/v1/chat/completions", json=body, headers={**bearer, "x-request-id": "req-ok-1"}
        )
        assert ok.status_code == 200
        assert chat(url, "chat", stream=True, **bearer).status_code == 200
        assert chat(url, "cut", stream=True, **bearer).status_code == 200
        assert chat(url, "rescued", **bearer).status_code == 200
        assert chat(url, "no-such-model", **bearer).status_code == 404
        body = {"model": "endless", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=bearer, timeout=10) as r:
            next(r.iter_bytes())  # the first chunk, then the client goes away
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 6)
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert all(set(line) == FIELDS for line in lines)
    first, stream, cut, rescued, missing, left = lines
    assert first["request_id"] == "req-ok-1" and first["key"] == "team-a"
    assert (first["route"], first["backend"], first["status"], first["stream"]) == ("chat", "a", 200, False)
    assert (first["tokens_in"], first["tokens_out"], first["finish_reason"]) == (5, 3, "stop")
    assert first["cost_usd"] == pytest.approx(11 / 1e6)
    assert first["upstream_ms"] > 0 and first["overhead_ms"] >= 0 and first["ttft_ms"] is None
    assert first["duration_ms"] >= first["upstream_ms"]
    assert first["disconnect"] == "none" and first["attempts"] == 1 and first["reason"] == "only target"
    assert stream["stream"] and stream["ttft_ms"] > 0 and stream["finish_reason"] == "stop"
    assert cut["stream_error"] and cut["disconnect"] == "upstream" and cut["error"] is not None
    assert rescued["attempts"] == 2 and rescued["reason"].startswith("fallback 1; after bad")
    assert (missing["status"], missing["route"], missing["error"]) == (404, "other", "model_not_found")
    assert (left["disconnect"], left["status"], left["stream"]) == ("client", 200, True)
    assert left["ttft_ms"] > 0 and left["finish_reason"] is None
    for secret in (secret_prompt, CLIENT_KEY, ADMIN_KEY, UPSTREAM_KEY, "Hello there"):
        assert secret not in text


def test_reloads_are_counted_by_result(up: FakeUpstream, tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(json.dumps(config(up)))  # JSON is YAML
    with run_gateway(path, reload_watch=False) as url:
        before = samples(url)
        assert httpx.post(url + "/admin/reload", timeout=10).status_code == 200
        path.write_text("models: [")
        assert httpx.post(url + "/admin/reload", timeout=10).status_code == 400
        found = samples(url)
    assert value(found, "interlock_config_reloads_total", result="unchanged") == 1
    assert value(found, "interlock_config_reloads_total", result="invalid") == 1
    assert [k for k in before if k[0] == "interlock_config_info"] == [
        k for k in found if k[0] == "interlock_config_info"
    ]


def test_redis_up_and_its_call_latency(up: FakeUpstream) -> None:
    cfg = config(up)
    cfg["models"]["chat"]["cache"] = {"ttl_s": 60}
    with run_gateway(cfg, redis_url="redis://127.0.0.1:6379/12") as url:
        body = {"model": "chat", "messages": [{"role": "user", "content": f"redis {time.time()}"}]}
        body["temperature"] = 0
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
        found = samples(url)
        assert value(found, "interlock_redis_up") == 1
        calls = value(found, "interlock_redis_call_duration_seconds_count")
        assert calls >= 2  # the lookup and the single flight's lock at least
        assert value(found, "interlock_redis_call_duration_seconds_bucket", le="+Inf") == calls
        assert value(found, "interlock_redis_errors_total") == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens once closed
    with run_gateway(cfg, redis_url=f"redis://127.0.0.1:{dead}/0") as url:
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
        assert value(samples(url), "interlock_redis_up") == 0


def test_the_access_log_reads_cached_tokens_from_the_reply_tail() -> None:
    from gateway.access_log import Entry, line

    tail = b'{"usage":{"prompt_tokens":9,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":8}}}'
    fields = dict.fromkeys(Entry._fields)
    entry = Entry(**{**fields, "time": 0.0, "duration_s": 0.0, "cost_usd": 0.0, "tail": tail})
    assert json.loads(line(entry))["cached_tokens"] == 8
    assert json.loads(line(entry._replace(tail=b"{}")))["cached_tokens"] is None
