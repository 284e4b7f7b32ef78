"""The status page's data and HTML, in process: rolling windows on a fake clock, the figures and
errors the recorder keeps from real requests through the app (``FakeBackend``s, no sockets),
the admin rule on ``/status``, and the page of 100 backends (rendered within 50 ms)."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from html.parser import HTMLParser
from typing import Any

import httpx
import orjson
import pytest

from backends.base import BackendRequest, BackendResponse
from backends.errors import BackendUnavailable
from gateway.app import build_app
from gateway.config import parse_config
from gateway.health import HealthMonitor
from gateway.router import Router
from gateway.snapshot import build_snapshot
from gateway.state import Gateway
from gateway.status import LimitsStatus, StatusRecorder, StatusReport, ThrottledKey
from gateway.status_page import fmt, render_html
from gateway.status_windows import SLOT_S, BackendFigures, RouteFigures, quantiles
from tests.fakes import Clock, FakeBackend, failing, stream_of

MESSAGES = [{"role": "user", "content": "hi"}]
ADMIN_KEY = "sk-admin-0001"
USER_KEY = "sk-user-0002"


# -- windows -------------------------------------------------------------------------------------


def test_rates_count_exactly_the_last_minute_and_five() -> None:
    clock = Clock(1000.0)
    f = BackendFigures(clock())
    for second in range(600):  # ten minutes: one ok call a second, a failure every tenth
        clock.now = 1000.0 + second + 0.5
        if clock.now >= f.next_mark:
            f.mark(clock.now)
        if second % 10 == 9:
            f.failed += 1
        else:
            f.ok += 1
            f.tokens += 20
    clock.now = 1600.0
    one, five = f.read(clock(), 60), f.read(clock(), 300)
    assert one["span_s"] == pytest.approx(60) and five["span_s"] == pytest.approx(300)
    assert one["rps"] == pytest.approx(1.0) and five["rps"] == pytest.approx(1.0)
    assert one["error_rate"] == pytest.approx(0.1) and five["error_rate"] == pytest.approx(0.1)
    assert one["tokens_per_s"] == pytest.approx(18.0)


def test_an_idle_backend_decays_to_zero_and_a_burst_counts_over_its_window() -> None:
    clock = Clock(1000.0)
    f = RouteFigures(clock())
    clock.advance(400)
    for _ in range(30):  # a burst of 30 requests in one instant, after minutes of nothing
        if clock() >= f.next_mark:
            f.mark(clock())
        f.requests += 1
    clock.advance(10)
    assert f.read(clock(), 60)["rps"] == pytest.approx(30 / 60, rel=0.1)
    assert f.read(clock(), 300)["rps"] == pytest.approx(30 / 300, rel=0.02)
    clock.advance(61)
    assert f.read(clock(), 60)["rps"] == 0
    assert f.read(clock(), 300)["rps"] == pytest.approx(30 / 300, rel=0.02)
    clock.advance(300)
    assert f.read(clock(), 300)["rps"] == 0


def test_a_young_gateway_rates_over_its_uptime() -> None:
    clock = Clock(1000.0)
    f = RouteFigures(clock())
    clock.advance(2.0)
    f.mark(clock())
    f.requests += 10
    clock.advance(2.0)
    assert f.read(clock(), 60)["rps"] == pytest.approx(10 / 4)


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_quantiles_from_the_bins_are_within_one_bin(q: float) -> None:
    import random

    from gateway.status_windows import BIN_BOUNDS

    rng = random.Random(7)
    values = sorted(rng.lognormvariate(-3, 1) for _ in range(5000))
    bins = [0] * (len(BIN_BOUNDS) + 1)
    from bisect import bisect_left

    for v in values:
        bins[bisect_left(BIN_BOUNDS, v)] += 1
    exact = values[int(q * (len(values) - 1))]
    assert quantiles(bins, (q,)) == [pytest.approx(exact, rel=0.12)]
    assert quantiles([0] * len(bins), (q,)) == [None]


def test_marks_are_taken_once_per_slot() -> None:
    clock = Clock(1000.0)
    f = BackendFigures(clock())
    for _ in range(999):  # 1000.01 to 1009.99: two slots
        clock.advance(0.01)
        if clock() >= f.next_mark:
            f.mark(clock())
    assert len(f.marks) == 1 + 10 / SLOT_S  # the start, and one per slot touched


# -- through the app -----------------------------------------------------------------------------


def _gateway(backends: dict[str, FakeBackend], models: dict[str, Any], **config: Any) -> Gateway:
    parsed = parse_config(
        {
            "backends": {n: {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"} for n in backends},
            "models": models,
            "resilience": {
                "health_check": {"interval_s": 0},
                "breaker": {"consecutive_failures": 2, "cooldown_s": 60},
                "retry": {"backoff_initial_s": 0.001, "backoff_max_s": 0.002},
            },
            **config,
        },
        "<test>",
    )
    snapshot = build_snapshot(parsed, backends)
    return Gateway(
        snapshot=snapshot,
        router=Router(),
        health=HealthMonitor(lambda: snapshot.targets.values(), interval_s=0, timeout_s=1),
    )


def _client(app: Any, host: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(host, 5000)), base_url="http://gw"
    )


async def test_requests_show_up_as_figures_states_and_errors_with_their_ids() -> None:
    async def slow_reply(_: BackendRequest) -> BackendResponse:
        from tests.fakes import reply

        return reply(completion_tokens=7)

    good = FakeBackend("good", slow_reply, stream_of(("a", "b", "c")))
    bad = FakeBackend("bad", failing(lambda: BackendUnavailable("upstream refused the connection")))
    gateway = _gateway(
        {"good": good, "bad": bad},
        {"chat": {"targets": ["good"]}, "rescued": {"targets": ["bad"], "fallback": ["good"]}},
    )
    for target in gateway.snapshot.targets.values():
        await gateway.health.started(target)
    app = build_app(gateway, max_body_bytes=1 << 20)
    async with _client(app) as client:
        for stream in (False, True, False):
            r = await client.post(
                "/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "stream": stream}
            )
            assert r.status_code == 200
        rescued = [
            (await client.post("/v1/chat/completions", json={"model": "rescued", "messages": MESSAGES}))
            for _ in range(2)
        ]
        assert [r.status_code for r in rescued] == [200, 200]
        missing = await client.post("/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
        assert missing.status_code == 404
        data = (await client.get("/status.json")).json()
        page = await client.get("/status")
    backends, routes = data["backends"], data["routes"]
    assert backends["good"]["state"] == "unchecked" and backends["bad"]["state"] == "open"
    assert backends["bad"]["last_error"] == "backend_unavailable: upstream refused the connection"
    assert backends["good"]["1m"]["error_rate"] == 0 and backends["bad"]["1m"]["error_rate"] == 1
    assert backends["good"]["1m"]["ttft_p50_ms"] is not None and backends["good"]["1m"]["tokens_per_s"] > 0
    assert routes["chat"]["1m"]["error_rate"] == 0 and routes["chat"]["1m"]["p95_ms"] is not None
    assert routes["rescued"]["1m"]["fallbacks"] == 2
    assert routes["rescued"]["order"] == [
        {"backend": "bad", "reason": "only target"},
        {"backend": "good", "reason": "fallback 1"},
    ]
    assert routes["chat"]["1m"]["cache_hit_rate"] is None  # the route does not cache
    # newest first; the 404 is the client's mistake, not an error of the gateway's
    assert [e["request_id"] for e in data["errors"]] == [r.headers["x-request-id"] for r in reversed(rescued)]
    assert data["errors"][0]["status"] == 200 and "bad: unavailable" in data["errors"][0]["message"]
    assert data["limits"] == {"configured": False, "mode": "none", "throttled_count": 0, "throttled": []}
    assert [r["id"] for r in data["replicas"]] == [data["gateway"]["replica"]]
    assert data["gateway"]["config"]["hash"] == gateway.snapshot.hash
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert rescued[1].headers["x-request-id"] in page.text
    assert re.search(r'data-k="backends bad state"[^>]*data-v="open"[^>]*>breaker open<', page.text)


def test_a_failed_request_is_listed_with_the_message_its_client_got() -> None:
    recorder = StatusRecorder()

    class Ex:
        failures = ("a: upstream_5xx",)
        prev = b""
        last = b'{"error":{"message":"every backend failed","type":"server_error","param":null,"code":null}}'
        error = None

    recorder.request_ended(Ex(), {"interlock.request_id": "req_1"}, "chat", "a", 502, False, 0.1, None, None)  # type: ignore[arg-type]
    (entry,) = recorder.errors
    assert entry["request_id"] == "req_1" and entry["status"] == 502
    assert entry["message"] == "every backend failed (after a: upstream_5xx)"


# -- who may read it -----------------------------------------------------------------------------


def _keyed_app() -> Any:
    keys = [
        {"name": "ops", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "admin": True},
        {"name": "app", "sha256": hashlib.sha256(USER_KEY.encode()).hexdigest()},
    ]
    gateway = _gateway({"a": FakeBackend("a")}, {"chat": {"targets": ["a"]}}, auth={"keys": keys})
    return build_app(gateway, max_body_bytes=1 << 20)


def _basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()


@pytest.mark.parametrize("path", ["/status", "/status.json"])
async def test_with_keys_only_an_admin_key_reads_it_as_bearer_or_basic(path: str) -> None:
    async with _client(_keyed_app(), host="10.0.0.7") as client:
        anonymous = await client.get(path)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Basic ")  # a browser asks for the key
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get(path, headers={"authorization": f"Bearer {USER_KEY}"})).status_code == 403
        assert (await client.get(path, headers={"authorization": _basic(USER_KEY)})).status_code == 403
        assert (await client.get(path, headers={"authorization": _basic("wrong")})).status_code == 401
        assert (await client.get(path, headers={"authorization": "Basic !!!"})).status_code == 401
        assert (await client.get(path, headers={"authorization": f"Bearer {ADMIN_KEY}"})).status_code == 200
        assert (await client.get(path, headers={"authorization": _basic(ADMIN_KEY)})).status_code == 200


async def test_without_keys_only_loopback_clients_read_it() -> None:
    gateway = _gateway({"a": FakeBackend("a")}, {"chat": {"targets": ["a"]}})
    app = build_app(gateway, max_body_bytes=1 << 20)
    async with _client(app, host="10.0.0.7") as client:
        refused = await client.get("/status")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"
    async with _client(app) as client:
        assert (await client.get("/status")).status_code == 200


# -- the page ------------------------------------------------------------------------------------


class _Bindings(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.backend_rows: list[str] = []
        self.route_rows: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("data-k"):
            self.paths.append(a["data-k"] or "")
        if tag == "tr" and a.get("data-backend"):
            self.backend_rows.append(a["data-backend"] or "")
        if tag == "tr" and a.get("data-route"):
            self.route_rows.append(a["data-route"] or "")
        self.scripts += tag == "script"


def _resolves(data: Any, path: str) -> bool:
    """Every step but the last exists (the value itself may be null); a list's row past its end
    is a hidden row of a fixed-size table."""
    node = data
    *parents, last = path.split(" ")
    for key in parents:
        if isinstance(node, list):
            if int(key) >= len(node):
                return True
            node = node[int(key)]
        else:
            node = node.get(key)
        if node is None:
            return False
    return (isinstance(node, dict) and last in node) or isinstance(node, list)


def _hundred() -> tuple[StatusReport, Gateway]:
    names = [f"backend-{i:03d}" for i in range(100)]
    models = {
        f"route-{r:03d}": {"policy": "balanced", "targets": [names[(r + k) % 100] for k in range(3)]}
        for r in range(100)
    }
    gateway = _gateway({n: FakeBackend(n) for n in names}, models)
    recorder = StatusRecorder()
    for i, target in enumerate(gateway.snapshot.targets.values()):
        f = recorder.windows.backend(target.name)
        f.mark(recorder.windows.clock())
        f.ok, f.failed, f.tokens = 100 + i, i % 7, 5000
        f.last_error, f.last_error_at = "<script>alert(1)</script>", time.time()
    for i in range(60):
        recorder.errors.append(
            {
                "at": time.time(),
                "request_id": f"req_{i}",
                "route": "route-001",
                "backend": "backend-001",
                "status": 502,
                "message": "boom",
            }
        )

    class SomeLimits:
        def limits_status(self) -> LimitsStatus:
            return LimitsStatus(True, "redis", [ThrottledKey("team-a", "rpm", 12.0)])

    return StatusReport(gateway, recorder, replica_id="r1", limits=SomeLimits()), gateway


def test_the_page_of_a_hundred_backends_binds_every_figure_and_renders_within_50ms() -> None:
    report, gateway = _hundred()
    data = orjson.loads(orjson.dumps(report.data()))  # as the browser gets it
    page = render_html(data)
    found = _Bindings()
    found.feed(page)
    assert found.backend_rows == list(gateway.snapshot.targets)
    assert found.route_rows == list(gateway.snapshot.routes)
    assert found.scripts == 1
    unresolved = [p for p in found.paths if not _resolves(data, p)]
    assert unresolved == []
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert len(data["errors"]) == 50 and data["errors"][0]["request_id"] == "req_59"
    assert "team-a" in page and "No limits configured" not in page
    timings = []
    for _ in range(10):
        start = time.perf_counter()
        render_html(report.data())
        timings.append(time.perf_counter() - start)
    # the best of ten: a loaded machine only ever adds time (benchmarks/status/bench.py: ~18 ms)
    assert min(timings) < 0.050, f"rendering took {min(timings) * 1000:.1f} ms"


@pytest.mark.parametrize(
    ("kind", "value", "shown"),
    [
        ("n", None, "\u2013"),
        ("n", 3.0, "3"),
        ("n", 3.26, "3.3"),
        ("n", 1234.5, "1234"),
        ("pct", 0.1234, "12.3%"),
        ("ms", 4.56, "4.6 ms"),
        ("ms", 456.4, "456 ms"),
        ("ms", 4560.0, "4.56 s"),
        ("dur", 59.9, "59s"),
        ("dur", 3725, "1h 2m"),
        ("dur", 90061, "1d 1h"),
        ("ago", 1000.0, "2m 5s ago"),
        ("hash", "0123456789abcdef", "0123456789ab"),
        ("state", "half_open", "breaker half-open"),
        ("t", True, "yes"),
    ],
)
def test_formats(kind: str, value: Any, shown: str) -> None:
    assert fmt(kind, value, now=1125.0) == shown


def test_pool_endpoints_draining_backends_and_other_replicas_are_shown() -> None:
    from types import SimpleNamespace

    from gateway.status import Replica

    class Pool(FakeBackend):
        kind = "vllm"

        def describe(self) -> dict[str, object]:
            return {
                "endpoints": [
                    {"url": "http://vllm-0:8000", "healthy": True, "in_flight": 3, "running": 2, "waiting": 1,
                     "kv_cache_usage": 0.42, "prefix_hit_rate": 0.875, "scrape_age_s": 1.5},
                    {"url": "http://vllm-1:8000", "healthy": False, "reason": "connection refused"},
                ]
            }  # fmt: skip

    gateway = _gateway({"pool": Pool("pool"), "old": FakeBackend("old")}, {"chat": {"targets": ["pool"]}})
    retired = gateway.snapshot.targets["old"]
    reloader = SimpleNamespace(
        draining=[retired],
        watching=True,
        last_result=None,
        last_attempt_at=None,
        last_error="bad yaml",
        results={},
    )

    class Fleet:
        def replicas(self) -> list[Replica]:
            return [
                Replica("r1", gateway.snapshot.hash, "0.1.0", time.time()),
                Replica("r2", "f" * 64, "0.1.0", time.time() - 3),
            ]

    report = StatusReport(gateway, StatusRecorder(), reloader=reloader, replicas=Fleet(), replica_id="r1")  # type: ignore[arg-type]
    data = report.data()
    endpoints = data["backends"]["pool"]["endpoints"]
    assert [e["url"] for e in endpoints] == ["http://vllm-0:8000", "http://vllm-1:8000"]
    assert endpoints[0]["kv_cache_usage"] == 0.42 and endpoints[0]["prefix_hit_rate"] == 0.875
    assert data["backends"]["old~draining"]["state"] == "draining"
    assert [(r["id"], r["this"], r["hash_differs"]) for r in data["replicas"]] == [
        ("r1", True, False),
        ("r2", False, True),
    ]
    assert data["gateway"]["reload"]["last_error"] == "bad yaml"
    page = render_html(data)
    assert 'id="endpoints"' in page and "http://vllm-1:8000" in page
    assert ">42.0%<" in page and ">87.5%<" in page
    assert 'data-k="replicas 1 hash_differs" data-v="true"' in page.replace(' class="flag"', "")
