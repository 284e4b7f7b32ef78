"""An upstream cannot exhaust the gateway's memory: non-streamed replies are capped after
decompression (``INTERLOCK_MAX_REPLY_BYTES``), and streams are relayed with bounded buffers.

The gateway runs in this process (``run_gateway``), so this process's RSS is the gateway's.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import run_gateway
from tests.fakes import chat_completion, chunk, free_port, openai_backend, serve_app

CAP = 8 * 1024 * 1024
GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024
CHAT = {"messages": [{"role": "user", "content": "Say hello."}]}


def gzip_bomb() -> bytes:
    """1 GiB of zeros, gzip-compressed a MiB at a time (about 1 MiB)."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MIB)
    parts = [squeeze.compress(zeros) for _ in range(GIB // MIB)]
    return b"".join([*parts, squeeze.flush()])


class Hostile:
    """An upstream whose replies are too big, by model name."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bomb = gzip_bomb()
        self.stream_sent = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        if model == "huge":  # a JSON-looking body that never ends short of 1 GiB
            response = web.StreamResponse(headers={"content-type": "application/json"})
            await response.prepare(request)
            await response.write(
                b'{"id": "x", "object": "chat.completion", "choices": [{"message": '
                b'{"role": "assistant", "content": "'
            )
            piece = b"a" * MIB
            for _ in range(GIB // MIB):
                await response.write(piece)
            await response.write(b'"}}]}')
            return response
        if model == "bomb":
            return web.Response(
                body=self.bomb, headers={"content-type": "application/json", "content-encoding": "gzip"}
            )
        if model == "gzipped":  # an honest compressed reply under the cap
            body = zlib.compress(orjson.dumps(chat_completion(model, "z" * MIB)), wbits=31)
            return web.Response(
                body=body, headers={"content-type": "application/json", "content-encoding": "gzip"}
            )
        if model == "firehose":  # SSE as fast as the reader takes it, up to 1 GiB
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            event = chunk(model, {"content": "x" * 60_000})
            while self.stream_sent < GIB:
                await response.write(event)
                self.stream_sent += len(event)
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.json_response(chat_completion(model))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    upstream = Hostile()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    stop = serve_app(app, upstream.port, shutdown_timeout=1)
    yield upstream
    stop()


@pytest.fixture(scope="module")
def gateway(hostile: Hostile) -> Iterator[str]:
    names = ("huge", "bomb", "gzipped", "firehose", "ok")
    backends = {n: openai_backend(hostile.base_url, n, first_token=10, total=60) for n in names}
    models: dict[str, Any] = {n: {"targets": [n]} for n in names}
    models["huge-then-ok"] = {"targets": ["huge", "ok"], "policy": "ordered", "attempts": 2}
    config = {
        "backends": backends,
        "models": models,
        "resilience": {"health_check": {"interval_s": 0}, "retry": {"attempts": 1}},
    }
    with run_gateway(config, max_reply_bytes=CAP) as url:
        yield url


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Samples this process's RSS every few ms; yields a list that holds the peak growth after."""
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss() - base)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], rss() - base)


@pytest.mark.parametrize("model", ["huge", "bomb"])
def test_an_oversized_reply_is_a_502_naming_the_limit_and_memory_stays_bounded(
    gateway: str, model: str
) -> None:
    with peak_rss_growth() as growth:
        response = httpx.post(gateway + "/v1/chat/completions", json={**CHAT, "model": model}, timeout=60)
    assert response.status_code == 502, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "upstream_reply_too_large"
    assert str(CAP) in error["message"] and "INTERLOCK_MAX_REPLY_BYTES" in error["message"]
    assert growth[0] < CAP + 50 * MIB, f"RSS grew {growth[0] / MIB:.0f} MiB"


def test_a_compressed_reply_under_the_cap_is_served(gateway: str) -> None:
    response = httpx.post(gateway + "/v1/chat/completions", json={**CHAT, "model": "gzipped"}, timeout=60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "z" * MIB


def test_an_oversized_reply_counts_as_the_backends_failure_and_the_route_falls_back(gateway: str) -> None:
    body = {**CHAT, "model": "huge-then-ok"}
    response = httpx.post(gateway + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.headers["x-interlock-backend"] == "ok"


def test_a_stream_the_client_does_not_read_holds_bounded_buffers(gateway: str, hostile: Hostile) -> None:
    """The client stops reading: backpressure must reach the upstream, not pile up in the gateway."""
    hostile.stream_sent = 0
    with (
        peak_rss_growth() as growth,
        httpx.stream(
            "POST",
            gateway + "/v1/chat/completions",
            json={**CHAT, "model": "firehose", "stream": True},
            timeout=60,
        ) as response,
    ):
        assert response.status_code == 200
        # wait until the upstream is held back (what it sent stops growing), bounded
        deadline, last, still_since = time.monotonic() + 30, -1, time.monotonic()
        while time.monotonic() < deadline:
            sent = hostile.stream_sent
            if sent != last:
                last, still_since = sent, time.monotonic()
            elif time.monotonic() - still_since > 1.0:
                break
            time.sleep(0.05)
    assert hostile.stream_sent < 64 * MIB, f"the upstream sent {hostile.stream_sent / MIB:.0f} MiB unread"
    assert growth[0] < 50 * MIB, f"RSS grew {growth[0] / MIB:.0f} MiB"
