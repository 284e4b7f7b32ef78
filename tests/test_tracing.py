"""OpenTelemetry traces through the real gateway in front of a fake upstream; spans are kept by the
SDK's in-memory exporter (the gateway's own exporter swapped for it), and the upstream records the
``traceparent`` it was sent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import gateway.server
from gateway import tracing
from tests.conftest import run_gateway
from tests.fakes import FakeUpstream, openai_backend

MESSAGES = [{"role": "user", "content": "Say hello."}]
FAST = {
    "breaker": {"consecutive_failures": 50},
    "health_check": {"interval_s": 0},
    "retry": {"backoff_initial_s": 0.001, "backoff_max_s": 0.01},
}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"


def config(up: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "backends": {
            "a": openai_backend(up.base_url, "ok"),
            "bad": openai_backend(up.base_url, "error500"),
        },
        "models": {
            "chat": {"targets": ["a"]},
            "rescued": {"targets": ["bad"], "fallback": ["a"]},
        },
        "resilience": FAST,
        **extra,
    }


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture()
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()

    def with_memory(setting: str, ratio: float) -> tracing.Tracing | None:
        if setting == "off":
            return None
        return tracing.Tracing(ratio, span_exporter=exporter)

    monkeypatch.setattr(gateway.server, "tracing_from", with_memory)
    yield exporter


def by_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.kind == kind]


def test_a_request_is_a_server_span_with_a_client_span_per_attempt(
    up: FakeUpstream, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    with run_gateway(config(up), traces="otlp", access_log=str(log)) as url:
        seen = len(up.headers)
        body = {"model": "rescued", "messages": MESSAGES, "max_tokens": 7, "temperature": 0.5}
        reply = httpx.post(
            url + "/v1/chat/completions", json=body, headers={"traceparent": CLIENT_PARENT}, timeout=10
        )
        assert reply.status_code == 200
        wait_for(lambda: len(by_kind(spans, SpanKind.SERVER)) == 1)
        wait_for(lambda: log.exists() and log.read_text().strip() != "")
    (server,) = by_kind(spans, SpanKind.SERVER)
    # the client's trace is continued: same trace id, its span as the parent
    assert f"{server.context.trace_id:032x}" == CLIENT_TRACE
    assert f"{server.parent.span_id:016x}" == "b7ad6b7169203331"
    assert server.name == "POST /v1/chat/completions"
    attrs = server.attributes
    assert attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "rescued"
    assert attrs["interlock.backend"] == "a" and attrs["gen_ai.response.model"] == "ok"
    assert attrs["interlock.route_reason"].startswith("fallback 1")
    # one client span per attempt: the failing primary, then the fallback that answered
    clients = sorted(by_kind(spans, SpanKind.CLIENT), key=lambda s: s.start_time)
    assert [c.attributes["interlock.backend"] for c in clients] == ["bad", "a"]
    for client in clients:
        assert client.parent.span_id == server.context.span_id
        assert client.context.trace_id == server.context.trace_id
        assert client.attributes["gen_ai.operation.name"] == "chat"
        assert client.attributes["gen_ai.provider.name"] == "openai"
        assert client.attributes["gen_ai.request.max_tokens"] == 7
        assert client.attributes["gen_ai.request.temperature"] == 0.5
        assert client.attributes["server.address"] == "127.0.0.1"
    bad, good = clients
    assert bad.name == "chat error500" and bad.status.status_code == StatusCode.ERROR
    assert bad.attributes["error.type"] == "500"
    assert good.name == "chat ok" and good.status.status_code == StatusCode.UNSET
    assert (good.attributes["gen_ai.usage.input_tokens"], good.attributes["gen_ai.usage.output_tokens"]) == (
        5,
        3,
    )
    # each upstream call was sent its own attempt's traceparent
    sent = [h.get("traceparent") or h.get("Traceparent") for h in up.headers[seen:]]
    assert sent == [f"00-{CLIENT_TRACE}-{c.context.span_id:016x}-01" for c in clients]
    # the access log line names the trace
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["trace_id"] == CLIENT_TRACE


def test_a_stream_span_ends_with_the_stream(up: FakeUpstream, spans: InMemorySpanExporter) -> None:
    with run_gateway(config(up), traces="otlp") as url:
        body = {"model": "chat", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            text = b"".join(r.iter_bytes())
        assert b"[DONE]" in text
        wait_for(lambda: len(by_kind(spans, SpanKind.SERVER)) == 1)
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client,) = by_kind(spans, SpanKind.CLIENT)
    assert server.attributes["interlock.stream"] is True
    assert server.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert client.end_time <= server.end_time and client.attributes["gen_ai.usage.output_tokens"] > 0
    assert client.attributes["interlock.attempt.outcome"] == "ok"


def sent_traceparents(up: FakeUpstream, seen: int) -> list[str | None]:
    return [h.get("traceparent") or h.get("Traceparent") for h in up.headers[seen:]]


def test_ratio_zero_records_only_what_a_client_sampled(
    up: FakeUpstream, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    cfg = config(up)
    cfg["models"]["chat"]["cache"] = {"ttl_s": 60}  # an unsampled lookup makes no span either
    log = tmp_path / "access.log"
    unsampled_parent = "00-11111111111111111111111111111111-2222222222222222-00"
    with run_gateway(cfg, traces="otlp", trace_sample_ratio=0.0, access_log=str(log)) as url:
        seen = len(up.headers)

        def post(content: str, headers: dict[str, str] | None = None) -> None:
            body = {"model": "chat", "messages": [{"role": "user", "content": content}]}
            assert httpx.post(url + "/v1/chat/completions", json=body, headers=headers).is_success

        for n in range(5):  # no traceparent: left out by the ratio, served as with tracing off
            post(f"root {n}")
        post("unsampled", {"traceparent": unsampled_parent})  # the client's choice, passed on
        post("sampled", {"traceparent": CLIENT_PARENT})  # honoured whatever the ratio
        wait_for(lambda: len(by_kind(spans, SpanKind.SERVER)) == 1)
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 7)
    # the gateway has stopped: any span a request made has ended and been exported
    assert {f"{s.context.trace_id:032x}" for s in spans.get_finished_spans()} == {CLIENT_TRACE}
    assert {s.name for s in spans.get_finished_spans()} == {
        "POST /v1/chat/completions",
        "interlock.cache",
        "chat ok",
    }
    sent = sent_traceparents(up, seen)
    assert sent[:5] == [None] * 5, sent
    assert sent[5] is not None and sent[5].startswith("00-11111111111111111111111111111111-")
    assert sent[5].endswith("-00") and sent[5] != unsampled_parent  # a span id of its own
    assert sent[6] is not None and sent[6].startswith(f"00-{CLIENT_TRACE}-") and sent[6].endswith("-01")
    logged = [json.loads(x)["trace_id"] for x in log.read_text().splitlines()]
    assert logged == [None] * 5 + ["11111111111111111111111111111111", CLIENT_TRACE]


def test_ratio_one_records_every_request(up: FakeUpstream, spans: InMemorySpanExporter) -> None:
    with run_gateway(config(up), traces="otlp", trace_sample_ratio=1.0) as url:
        seen = len(up.headers)
        for _ in range(3):
            assert httpx.post(
                url + "/v1/chat/completions", json={"model": "chat", "messages": MESSAGES}
            ).is_success
        wait_for(lambda: len(by_kind(spans, SpanKind.CLIENT)) == 3)
    clients = sorted(by_kind(spans, SpanKind.CLIENT), key=lambda s: s.start_time)
    assert len({c.context.trace_id for c in clients}) == 3  # each request a trace of its own
    sent = sent_traceparents(up, seen)
    # the flags: sampled (bit 0) and, the SDK's ids being random, W3C level 2's random (bit 1)
    assert [p and p[:-3] for p in sent] == [
        f"00-{c.context.trace_id:032x}-{c.context.span_id:016x}" for c in clients
    ]
    assert all(p and int(p[-2:], 16) & 1 for p in sent), sent
    assert len(by_kind(spans, SpanKind.SERVER)) == 3


@pytest.mark.parametrize(
    ("ratio", "low", "high"),
    # 2,000 draws: 5 standard deviations either side of ratio * 2,000 (the draws are seeded)
    [(0.0, 0, 0), (0.01, 0, 42), (0.25, 403, 597), (1.0, 2000, 2000)],
)
def test_a_request_without_a_traceparent_is_sampled_with_the_ratio(
    spans: InMemorySpanExporter, ratio: float, low: int, high: int
) -> None:
    traced = tracing.Tracing(ratio, span_exporter=spans)
    traced._random.seed(23)
    served: list[str | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        served.append(scope.get(tracing.TRACE_ID_KEY))

    endpoint = traced.trace(app)
    invalid = [(b"traceparent", b"00-not-a-trace-01")]  # ignored (W3C): sampled as with none

    async def requests() -> None:
        for n in range(2000):
            headers = invalid if n % 2 else [(b"content-type", b"application/json")]
            scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
            await endpoint(scope, None, None)

    asyncio.run(requests())
    recorded = len(spans.get_finished_spans())
    assert low <= recorded <= high, recorded
    assert len(served) == 2000 and sum(t is not None for t in served) == recorded


def test_tracing_off_sends_no_traceparent_and_makes_no_spans(
    up: FakeUpstream, spans: InMemorySpanExporter
) -> None:
    with run_gateway(config(up)) as url:
        seen = len(up.headers)
        reply = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "chat", "messages": MESSAGES},
            headers={"traceparent": CLIENT_PARENT},
        )
        assert reply.is_success
    assert not any("traceparent" in {k.lower() for k in h} for h in up.headers[seen:])
    assert spans.get_finished_spans() == ()
    assert tracing.step("interlock.limits") is tracing.step("other")  # the shared no-op


def test_the_cache_lookup_is_a_span_and_a_hit_makes_no_client_span(
    up: FakeUpstream, spans: InMemorySpanExporter
) -> None:
    cfg = config(up)
    cfg["models"]["chat"]["cache"] = {"ttl_s": 60}  # the in-process tier: no Redis needed
    with run_gateway(cfg, traces="otlp") as url:
        body = {"model": "chat", "messages": MESSAGES, "temperature": 0}
        for expected in ("miss", "hit"):
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
            assert reply.headers["x-interlock-cache"] == expected
        wait_for(lambda: len(by_kind(spans, SpanKind.SERVER)) == 2)
    caches = sorted(
        (s for s in spans.get_finished_spans() if s.name == "interlock.cache"), key=lambda s: s.start_time
    )
    assert [c.attributes["interlock.cache.result"] for c in caches] == ["miss", "hit"]
    servers = sorted(by_kind(spans, SpanKind.SERVER), key=lambda s: s.start_time)
    for cache, server in zip(caches, servers, strict=True):
        assert cache.parent.span_id == server.context.span_id
    (client,) = by_kind(spans, SpanKind.CLIENT)  # the hit never called upstream
    assert client.context.trace_id == servers[0].context.trace_id
    # the lookup span ends where the upstream call begins
    assert caches[0].end_time <= client.start_time


def test_the_step_seam_opens_a_child_span(spans: InMemorySpanExporter) -> None:
    traced = tracing.Tracing(1.0, span_exporter=spans)
    token = tracing._CURRENT.set(tracing._Request(traced, {}))
    try:
        with (
            traced.tracer.start_as_current_span("parent") as parent,
            tracing.step("interlock.limits", rule="x"),
        ):
            pass
    finally:
        tracing._CURRENT.reset(token)
    (child,) = [s for s in spans.get_finished_spans() if s.name == "interlock.limits"]
    assert child.parent.span_id == parent.get_span_context().span_id
    assert child.attributes["rule"] == "x"
