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
    long          streams 40 more chunks, one every 50 ms, then finishes
    endless       streams a chunk every 20 ms until the client goes away
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from backends.base import BackendRequest, BackendResponse, Health, Load, Usage

UPSTREAM_KEY = "sk-upstream-secret-0123456789"


class Clock:
    """A monotonic clock that moves only when a test says so (breakers, stats, budgets take one)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_for(condition: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; a loaded machine gets the whole ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(app: web.Application, port: int, *, shutdown_timeout: float = 60.0) -> Callable[[], None]:
    """Serve ``app`` on 127.0.0.1:``port`` from a thread and event loop of its own (the gateway under
    test runs in another); returns the function that stops it."""
    ready = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(5):
        raise RuntimeError(f"the test server on port {port} did not start")

    def stop() -> None:
        loops[0].call_soon_threadsafe(loops[0].stop)
        thread.join(5)

    return stop


def chat_completion(model: str, content: str = "Hello there.") -> dict[str, object]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def chunk(model: str, delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
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
            return web.json_response(
                {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}},
                status=500,
            )
        if model == "garbage":
            return web.Response(body=b"<html>oops", content_type="application/json")
        if model == "ratelimited":
            return web.json_response(
                {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}},
                status=429,
                headers={"Retry-After": "7"},
            )
        if model == "leaky":
            return web.json_response(
                {
                    "error": {
                        "message": f"bad key {UPSTREAM_KEY} at http://127.0.0.1:{self.port}/v1",
                        "type": "x",
                    }
                },
                status=400,
            )
        if model == "leakyfields":
            return web.json_response(
                {
                    "error": {
                        "message": "no",
                        "type": f"127.0.0.1:{self.port}",
                        "param": f"key={UPSTREAM_KEY}",
                        "code": self.base_url,
                    }
                },
                status=422,
            )
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
            if model == "long":  # a reply that takes ~2 s: long enough to stop a server during it
                for _ in range(40):
                    await asyncio.sleep(0.05)
                    await response.write(chunk(model, {"content": " more"}))
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
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        self._stop = serve_app(app, self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()


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
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
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


def openai_backend(
    base_url: str,
    model: str | None = None,
    *,
    api_key: str | None = UPSTREAM_KEY,
    first_token: float = 0.5,
    total: float = 5.0,
    **extra: object,
) -> dict[str, object]:
    """A ``kind: openai`` backend block for a routing config; ``model`` picks the fake's behaviour."""
    block: dict[str, object] = {
        "kind": "openai",
        "base_url": base_url,
        "timeouts": {"connect": 1.0, "first_token": first_token, "total": total},
        **extra,
    }
    if model is not None:
        block["model"] = model
    if api_key is not None:
        block["api_key"] = api_key
    return block


def closed_url() -> str:
    """A loopback base URL on which nothing listens: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}/v1"


# --- in-process backends for router tests -----------------------------------------------------

#: ``complete()`` of a FakeBackend: one request in, one reply out (or a ``backends.errors`` raise)
CompleteHandler = Callable[[BackendRequest], Awaitable[BackendResponse]]
#: ``stream()`` of a FakeBackend: an async generator of SSE bytes; raising before the first
#: yield is a refusal the router may fall back from, raising later is a mid-stream failure
StreamHandler = Callable[[BackendRequest], AsyncIterator[bytes]]

DONE_EVENT = b"data: [DONE]\n\n"


def reply(
    content: str = "Hello there.", prompt_tokens: int = 5, completion_tokens: int = 3
) -> BackendResponse:
    """A complete chat reply as a backend returns it, with the usage in the body and alongside."""
    body = chat_completion("fake", content)
    body["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return BackendResponse(orjson.dumps(body), Usage(prompt_tokens, completion_tokens))


async def ok_handler(_: BackendRequest) -> BackendResponse:
    return reply()


def failing(make_error: Callable[[], BaseException]) -> CompleteHandler:
    """A complete handler that raises a fresh ``make_error()`` on every call."""

    async def handler(_: BackendRequest) -> BackendResponse:
        raise make_error()

    return handler


def stream_of(
    pieces: Sequence[str] = ("Hello", " there."),
    *,
    then: BaseException | None = None,
    before_first: BaseException | None = None,
) -> StreamHandler:
    """A stream handler yielding one SSE chunk per piece (after a role chunk) and [DONE];
    ``before_first`` is raised before any byte, ``then`` after the pieces instead of the end."""

    async def handler(_: BackendRequest) -> AsyncIterator[bytes]:
        if before_first is not None:
            raise before_first
        yield chunk("fake", {"role": "assistant", "content": ""})
        for piece in pieces:
            yield chunk("fake", {"content": piece})
        if then is not None:
            raise then
        yield chunk("fake", {}, "stop")
        yield DONE_EVENT

    return handler


class FakeBackend:
    """An in-process ``backends.base.Backend`` driven by handlers: no sockets, no threads.

    Counts what the router did to it (``calls``, ``stream_calls``, ``health_calls``), what its
    handlers saw (``cancelled``: an attempt cancelled while running, e.g. a hedge that lost;
    ``failures``: a handler raised) and what is running now (``in_flight``, reported by load()).
    ``health_result`` is what health() answers; swap ``handler``/``stream_handler`` at any time.
    """

    kind = "fake"

    def __init__(
        self,
        name: str = "fake",
        handler: CompleteHandler = ok_handler,
        stream_handler: StreamHandler | None = None,
        *,
        health: Health | None = None,
        capacity: int | None = None,
    ) -> None:
        self.name = name
        self.handler = handler
        self.stream_handler = stream_handler or stream_of()
        self.health_result = health or Health(True)
        self.capacity = capacity
        self.requests: list[BackendRequest] = []
        self.calls = 0
        self.stream_calls = 0
        self.health_calls = 0
        self.cancelled = 0
        self.failures = 0
        self.in_flight = 0
        self.started = False
        self.closed = False
        #: what load() reports as ``full`` and fatal() answers; tests set them
        self.full = False
        self.fatal_reason: str | None = None

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def complete(self, request: BackendRequest) -> BackendResponse:
        self.calls += 1
        self.requests.append(request)
        self.in_flight += 1
        try:
            return await self.handler(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except Exception:
            self.failures += 1
            raise
        finally:
            self.in_flight -= 1

    async def stream(self, request: BackendRequest) -> AsyncIterator[bytes]:
        self.stream_calls += 1
        self.requests.append(request)
        return self._relay(self.stream_handler(request))

    async def _relay(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.in_flight += 1
        try:
            async for piece in chunks:
                yield piece
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except Exception:
            self.failures += 1
            raise
        finally:
            self.in_flight -= 1
            await chunks.aclose()  # type: ignore[attr-defined]

    async def health(self) -> Health:
        self.health_calls += 1
        return self.health_result

    def load(self) -> Load:
        return Load(in_flight=self.in_flight, capacity=self.capacity, full=self.full)

    def fatal(self) -> str | None:
        return self.fatal_reason

    def describe(self) -> dict[str, object]:
        return {}


# --- a misbehaving upstream on loopback, switchable at any time ---------------------------------

#: what ChaosUpstream does with a POST (GET /v1/models answers 200 only in "ok")
CHAOS_MODES = ("ok", "error500", "timeout", "slow_first_byte", "reset", "cut", "ratelimited")


@dataclass
class ChaosUpstream:
    """An OpenAI-compatible upstream (aiohttp on loopback, in a thread) whose behaviour is the
    mutable ``mode``, settable from the test at any moment:

        ok               a normal reply (JSON, or SSE with [DONE])
        error500         HTTP 500 with an OpenAI error body
        timeout          never answers; holds the request until the client gives up
        slow_first_byte  answers normally after ``slow_s`` seconds
        reset            closes the TCP connection with a RST, without answering
        cut              streams: two chunks, then the connection drops; JSON: half a body, then drops
        ratelimited      HTTP 429 with ``Retry-After: <retry_after>``

    With ``chance`` < 1 each request gets ``mode`` with that probability (from a ``seed``-ed RNG,
    one draw per POST in arrival order) and "ok" otherwise. Counters: ``received`` (POSTs),
    ``by_mode`` (what each POST got), ``models_requests`` (GET /v1/models), ``completed``
    (replies sent in full), ``client_gone`` (held requests whose client left first).
    """

    mode: str = "ok"
    chance: float = 1.0
    seed: int = 0
    slow_s: float = 1.5
    retry_after: int = 30
    port: int = field(default_factory=free_port)
    received: int = 0
    models_requests: int = 0
    completed: int = 0
    client_gone: int = 0
    by_mode: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._stopping = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _pick(self) -> str:
        mode = self.mode
        if mode not in CHAOS_MODES:
            raise ValueError(f"unknown chaos mode {mode!r}")
        if self.chance >= 1.0:
            return mode
        return mode if self._rng.random() < self.chance else "ok"

    async def _hold(self, request: web.Request, seconds: float) -> bool:
        """Wait ``seconds``; False as soon as the client disconnects (or the server stops)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            transport = request.transport
            if self._stopping.is_set() or transport is None or transport.is_closing():
                self.client_gone += 1
                return False
            await asyncio.sleep(min(0.01, left))
        return True

    @staticmethod
    def _drop(request: web.Request, *, reset: bool) -> None:
        transport = request.transport
        if transport is None:
            return
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends a RST instead of a FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()

    async def _models(self, _: web.Request) -> web.Response:
        self.models_requests += 1
        if self.mode != "ok":
            return web.json_response(
                {
                    "error": {
                        "message": f"chaos: {self.mode}",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=500,
            )
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "chaos", "object": "model", "created": 1, "owned_by": "chaos"}],
            }
        )

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received += 1
        mode = self._pick()
        self.by_mode[mode] += 1
        model = str(body.get("model") or "chaos")
        if mode == "error500":
            return web.json_response(
                {"error": {"message": "chaos: boom", "type": "server_error", "param": None, "code": None}},
                status=500,
            )
        if mode == "ratelimited":
            return web.json_response(
                {
                    "error": {
                        "message": "chaos: slow down",
                        "type": "rate_limit_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=429,
                headers={"Retry-After": str(self.retry_after)},
            )
        if mode == "reset":
            self._drop(request, reset=True)
            return web.Response()
        if mode == "timeout":
            await self._hold(request, 120.0)
            return web.Response(status=504)
        if mode == "slow_first_byte" and not await self._hold(request, self.slow_s):
            return web.Response(status=499)
        if not body.get("stream"):
            payload = orjson.dumps(chat_completion(model))
            if mode != "cut":
                self.completed += 1
                return web.Response(body=payload, content_type="application/json")
            response = web.StreamResponse(headers={"content-type": "application/json"})
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            await asyncio.sleep(0.02)
            self._drop(request, reset=False)
            return response
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(chunk(model, {"role": "assistant", "content": ""}))
            await response.write(chunk(model, {"content": "Hello"}))
            if mode == "cut":
                await asyncio.sleep(0.02)
                self._drop(request, reset=False)
                return response
            await response.write(chunk(model, {"content": " there."}))
            await response.write(chunk(model, {}, "stop"))
            await response.write(DONE_EVENT)
        except (ConnectionError, asyncio.CancelledError):
            self.client_gone += 1
            raise
        self.completed += 1
        return response

    def __enter__(self) -> ChaosUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._post)
        app.router.add_post("/v1/completions", self._post)
        app.router.add_get("/v1/models", self._models)
        self._stop = serve_app(app, self.port, shutdown_timeout=1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._stop()
