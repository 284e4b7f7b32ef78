"""Overload is not an outage: a burst of 10x a backend's capacity, then normal load.

A backend that refuses because it is full (the in-process queue, an upstream's 503 or 429) is
busy, not failing: the overflow gets 503/429 with Retry-After, the rest are served, the circuit
stays closed, readiness stays 200, and the first request after the burst is served at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import run_gateway, smollm2_gguf, wait_ready
from tests.fakes import chat_completion, free_port, serve_app

MESSAGES = [{"role": "user", "content": "Say hi."}]


async def _burst(url: str, n: int, body: dict[str, Any]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))


def _breaker(url: str, model: str) -> dict[str, Any]:
    order = httpx.get(url + "/admin/routes", timeout=5).json()["routes"][model]["order"]
    return order[0]["breaker"]


def _check_burst(url: str, model: str, responses: list[httpx.Response], busy_status: int) -> None:
    statuses = [r.status_code for r in responses]
    served = statuses.count(200)
    refused = [r for r in responses if r.status_code != 200]
    assert served > 0, "nothing was served"
    assert refused, "a burst of 10x capacity was served whole: the test did not overload anything"
    assert {r.status_code for r in refused} == {busy_status}, statuses
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "overloaded_error"
    breaker = _breaker(url, model)
    assert (breaker["state"], breaker["failures_in_window"], breaker["trips"]) == ("closed", 0, 0)
    assert httpx.get(url + "/health/ready", timeout=5).status_code == 200
    # the first request after the burst is served at once: no circuit to wait out
    after = httpx.post(
        url + "/v1/chat/completions", timeout=60, json={"model": model, "messages": MESSAGES, "max_tokens": 4}
    )
    assert after.status_code == 200, after.text


@pytest.mark.slow
def test_a_burst_of_ten_times_the_embedded_engines_capacity() -> None:
    parallel, queue = 4, 16  # the embedded default's shape (8 + 64), smaller so the test is quick
    config = {
        "backends": {
            "local": {
                "kind": "llamacpp",
                "model_path": smollm2_gguf(),
                "n_ctx": 2048,
                "parallel": parallel,
                "max_queue": queue,
                "n_threads": 2,
            }
        },
        "models": {"smollm2": {"targets": ["local"]}},
    }
    with run_gateway(config) as url:
        wait_ready(url)
        body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        responses = asyncio.run(_burst(url, 10 * (parallel + queue), body))
        _check_burst(url, "smollm2", responses, 503)


class _CappedUpstream:
    """An OpenAI-compatible upstream that serves ``capacity`` requests at once and refuses the rest
    with ``status`` (vLLM's 503 under load, a hosted API's 429), without a Retry-After."""

    def __init__(self, status: int, capacity: int = 5) -> None:
        self.status, self.capacity = status, capacity
        self.in_flight = self.served = self.refused = 0
        self.port = free_port()
        self._lock = threading.Lock()
        self._stop = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            full = self.in_flight >= self.capacity
            if full:
                self.refused += 1
            else:
                self.in_flight += 1
        if full:
            return web.json_response(
                {"error": {"message": "server busy", "type": "overloaded", "param": None, "code": None}},
                status=self.status,
            )
        try:
            await asyncio.sleep(0.05)
            return web.Response(
                body=orjson.dumps(chat_completion(body["model"])), content_type="application/json"
            )
        finally:
            with self._lock:
                self.in_flight -= 1
                self.served += 1

    def __enter__(self) -> _CappedUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/v1/models", lambda _: web.json_response({"object": "list", "data": []}))
        self._stop = serve_app(app, self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._stop()


@pytest.fixture(params=[503, 429])
def capped(request: pytest.FixtureRequest) -> Iterator[_CappedUpstream]:
    with _CappedUpstream(request.param) as upstream:
        yield upstream


def test_a_burst_against_an_upstream_that_refuses_under_load(capped: _CappedUpstream) -> None:
    config = {
        "backends": {"up": {"kind": "openai", "base_url": f"http://127.0.0.1:{capped.port}/v1"}},
        "models": {"m": {"targets": ["up"]}},
    }
    with run_gateway(config) as url:
        wait_ready(url)
        responses = asyncio.run(_burst(url, 10 * capped.capacity, {"model": "m", "messages": MESSAGES}))
        _check_burst(url, "m", responses, capped.status)
        assert capped.refused > 0
