"""Upstream replies that look fine on the wire and are not: a 200 whose body is not a JSON object,
and a stream that stalls with its connection open. Real sockets on loopback throughout."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import run_gateway
from tests.fakes import chat_completion, chunk, free_port, openai_backend, serve_app

MESSAGES = [{"role": "user", "content": "Say hello."}]
GOOD = orjson.dumps(chat_completion("ok"))
#: 200 application/json bodies that do not parse as a JSON object, by the model that gets them
BAD_BODIES = {
    "notjson": b"{not json}",
    "badutf8": b'{"id": "x", "object": "chat.completion", "choices": [], "note": "\xff\xfe"}',
    "truncated": GOOD[:-1],  # still ends with a brace: usage's
    "array": b"[" + GOOD + b"]",
}
QUIET = {
    "retry": {"attempts": 2},
    "health_check": {"interval_s": 0},
    "breaker": {"consecutive_failures": 1000, "window": 1000, "min_calls": 1000},
}


class OddUpstream:
    """OpenAI- and Ollama-shaped replies picked by ``model``: a BAD_BODIES body; ``stall``: two
    chunks (SSE, or NDJSON on /api/chat), then nothing with the connection open until the client
    leaves; ``steady``: 20 chunks 0.1 s apart, then the end; anything else: a good reply."""

    def __init__(self) -> None:
        self.port = free_port()
        self.client_left = threading.Event()
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _hold(self, request: web.Request) -> None:
        for _ in range(6000):  # at most a minute
            transport = request.transport
            if self._stopping.is_set() or transport is None or transport.is_closing():
                self.client_left.set()
                return
            await asyncio.sleep(0.01)

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        if model in BAD_BODIES:
            return web.Response(body=BAD_BODIES[model], content_type="application/json")
        if not body.get("stream"):
            return web.Response(body=GOOD, content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk(model, {"role": "assistant", "content": ""}))
        await response.write(chunk(model, {"content": "Hello"}))
        if model == "stall":
            await self._hold(request)
            return response
        for _ in range(20 if model == "steady" else 0):
            await asyncio.sleep(0.1)
            await response.write(chunk(model, {"content": " more"}))
        await response.write(chunk(model, {}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def ollama(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await response.prepare(request)
        for word in ("Hello", " there"):
            await response.write(
                orjson.dumps(
                    {
                        "model": body["model"],
                        "created_at": "2024-01-01T00:00:00Z",
                        "message": {"role": "assistant", "content": word},
                        "done": False,
                    }
                )
                + b"\n"
            )
        await self._hold(request)
        return response

    def __enter__(self) -> OddUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_post("/api/chat", self.ollama)
        self._stop = serve_app(app, self.port, shutdown_timeout=1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[OddUpstream]:
    with OddUpstream() as odd:
        yield odd


@pytest.fixture(scope="module")
def gateway(upstream: OddUpstream) -> Iterator[str]:
    base = upstream.url + "/v1"
    backends: dict[str, Any] = {name: openai_backend(base, name) for name in BAD_BODIES}
    backends["ok"] = openai_backend(base, "ok")
    for name in ("stall", "steady"):
        backends[name] = openai_backend(base, name, total=30)
        backends[name]["timeouts"]["idle"] = 1.0  # type: ignore[index]
    backends["ollama-stall"] = {
        "kind": "ollama",
        "url": upstream.url,
        "model": "m",
        "preload": False,
        "timeouts": {"connect": 1, "first_token": 5, "total": 30, "idle": 1.0},
    }
    models: dict[str, Any] = {name: {"targets": [name]} for name in (*BAD_BODIES, "stall", "steady")}
    models.update({f"{name}-or-ok": {"targets": [name], "fallback": ["ok"]} for name in BAD_BODIES})
    models["ollama-stall"] = {"targets": ["ollama-stall"]}
    with run_gateway({"backends": backends, "models": models, "resilience": QUIET}) as url:
        yield url


def post(url: str, model: str, **fields: Any) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions", json={"model": model, "messages": MESSAGES, **fields}, timeout=20
    )


def events(raw: bytes) -> list[str]:
    return [line[len(b"data: ") :].decode() for line in raw.split(b"\n") if line.startswith(b"data: ")]


@pytest.mark.parametrize("model", list(BAD_BODIES))
def test_a_200_that_is_not_a_json_object_is_a_502(gateway: str, model: str) -> None:
    response = post(gateway, model)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "backend_unavailable"
    assert "JSON" in error["message"]
    with (
        openai.OpenAI(base_url=gateway + "/v1", api_key="k", max_retries=0) as client,
        pytest.raises(openai.InternalServerError),
    ):
        client.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]


@pytest.mark.parametrize("model", list(BAD_BODIES))
def test_a_200_that_is_not_a_json_object_falls_back(gateway: str, model: str) -> None:
    response = post(gateway, f"{model}-or-ok")
    assert response.status_code == 200
    assert response.headers["x-interlock-backend"] == "ok"
    assert response.json()["choices"][0]["message"]["content"] == "Hello there."


@pytest.mark.parametrize(("model", "who"), [("stall", "the upstream"), ("ollama-stall", "ollama")])
def test_a_stalled_stream_ends_with_an_error_event_after_the_idle_timeout(
    gateway: str, upstream: OddUpstream, model: str, who: str
) -> None:
    upstream.client_left.clear()
    started = time.monotonic()
    response = post(gateway, model, stream=True)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    sent = events(response.content)
    assert sent[-1] == "[DONE]"
    error = orjson.loads(sent[-2])["error"]
    assert error["code"] == "backend_timeout"
    assert error["message"] == f"no bytes from {who} for 1s"
    assert "Hello" in response.text
    assert elapsed < 15, "the stall held the client far past the idle timeout"
    assert upstream.client_left.wait(5), "the stalled upstream connection was left open"


def test_a_slow_but_steady_stream_is_not_idle(gateway: str) -> None:
    """20 gaps of 0.1 s: 2 s in all, past the 1 s idle timeout, and never idle that long."""
    response = post(gateway, "steady", stream=True)
    sent = events(response.content)
    assert sent[-1] == "[DONE]"
    assert not any('"error"' in event for event in sent)
    assert response.text.count(" more") == 20
