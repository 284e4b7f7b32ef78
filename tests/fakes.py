"""A fake OpenAI-compatible upstream for edge cases a real server will not produce on demand.

It speaks the real wire protocol (JSON replies, SSE ``data:`` frames, OpenAI error
bodies); the behaviour is picked by the request's ``model``:

    ok            a normal reply (stream or not)
    slow          first byte after ``slow_s`` seconds
    cut           stream stops after two chunks without [DONE] (connection dropped)
    error500      HTTP 500 with an OpenAI error body
    garbage       HTTP 200 with a body that is not JSON
    ratelimited   HTTP 429 with Retry-After: 7
    leaky         HTTP 400 whose message quotes the upstream key
    leakyfields   HTTP 422 with the upstream key and address in type, param and code
    endless       streams a chunk every 20 ms until the client goes away
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

UPSTREAM_KEY = "sk-upstream-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_completion(model: str, content: str = "Hello there.") -> dict[str, object]:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def chunk(model: str, delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


@dataclass
class FakeUpstream:
    slow_s: float = 2.0
    port: int = field(default_factory=free_port)
    requests: list[dict[str, object]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: set when a streaming handler noticed its client had gone
    disconnected: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        model = body.get("model", "ok")
        if model == "error500":
            return web.json_response({"error": {"message": "boom", "type": "server_error",
                                                "param": None, "code": None}}, status=500)
        if model == "garbage":
            return web.Response(body=b"<html>oops", content_type="application/json")
        if model == "ratelimited":
            return web.json_response({"error": {"message": "slow down", "type": "rate_limit_error",
                                                "param": None, "code": None}},
                                     status=429, headers={"Retry-After": "7"})
        if model == "leaky":
            return web.json_response({"error": {"message": f"bad key {UPSTREAM_KEY} at "
                                                f"http://127.0.0.1:{self.port}/v1", "type": "x"}}, status=400)
        if model == "leakyfields":
            return web.json_response({"error": {"message": "no", "type": f"127.0.0.1:{self.port}",
                                                "param": f"key={UPSTREAM_KEY}", "code": self.base_url}},
                                     status=422)
        if model == "slow":
            await asyncio.sleep(self.slow_s)
        if not body.get("stream"):
            return web.json_response(chat_completion(model))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(chunk(model, {"role": "assistant", "content": ""}))
            await response.write(chunk(model, {"content": "Hello"}))
            if model == "cut":
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()
                return response
            if model == "endless":
                for _ in range(5000):
                    await asyncio.sleep(0.02)
                    await response.write(chunk(model, {"content": " more"}))
            await response.write(chunk(model, {"content": " there."}))
            await response.write(chunk(model, {}, "stop"))
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response

    def __enter__(self) -> FakeUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self.handle)
            app.router.add_post("/v1/completions", self.handle)
            runner = web.AppRunner(app, handle_signals=False)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class ClosingUpstream:
    """Answers one request per connection and then closes it *without* ``Connection: close``,
    as llama.cpp's server does after streams: the client's pool is left holding a dead socket."""

    def __init__(self) -> None:
        self.port = free_port()
        self.connections = 0
        self.requests = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        self.requests += 1
        body = orjson.dumps(chat_completion("ok"))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    def __enter__(self) -> ClosingUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
            ready.set()
            loop.run_forever()
            server.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def openai_backend(base_url: str, model: str | None = None, *, api_key: str | None = UPSTREAM_KEY,
                   first_token: float = 0.5, total: float = 5.0, **extra: object) -> dict[str, object]:
    """A ``kind: openai`` backend block for a routing config; ``model`` picks the fake's behaviour."""
    block: dict[str, object] = {
        "kind": "openai", "base_url": base_url,
        "timeouts": {"connect": 1.0, "first_token": first_token, "total": total}, **extra,
    }
    if model is not None:
        block["model"] = model
    if api_key is not None:
        block["api_key"] = api_key
    return block


def closed_url() -> str:
    """A loopback base URL on which nothing listens: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}/v1"
