"""The three inference endpoints as plain ASGI: the hot path.

Every request to ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``
comes through here without Starlette's routing, Request/Response objects or
exception middleware (about a third of the gateway's own CPU per request on the
2-core benchmark machine). Read, parse, hand to ``gateway.serving``, reply; streams go out through
``_write_stream``; on the gateway's own server (``gateway.http_server``) the connection's
protocol cancels a request whose client left, with no listener task per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from time import perf_counter
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.base import Endpoint
from backends.errors import InterlockError
from gateway.cache_step import Replayed
from gateway.errors import client_status, error_body, sse_error_event
from gateway.http_server import EDGE_KEY, EdgeProtocol
from gateway.metrics_edge import CACHE_BACKEND, CURRENT, Exchange, Observer
from gateway.middleware import CLIENT_KEY, REQUEST_ID_KEY, send_error
from gateway.protocol import parse_body
from gateway.router import Opened
from gateway.serving import ClientRequest, Serving
from gateway.shutdown import until_shutdown
from gateway.snapshot import Target

log = logging.getLogger("interlock.app")

T = TypeVar("T")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_SSE_TYPE = "text/event-stream"
#: what Starlette's StreamingResponse sends for it, so that both ways of streaming look alike
_SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
_JSON = (b"content-type", b"application/json")
#: the parsed ``ClientRequest``, left in the scope for ``gateway.metrics`` (model, stream)
CLIENT_REQUEST_KEY = "interlock.client_request"


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class Inference:
    """One inference endpoint (chat, completions or embeddings) as an ASGI app: read, parse,
    hand to ``Serving``, write the reply as JSON or SSE."""

    def __init__(self, serving: Serving, endpoint: Endpoint, observer: Observer | None = None) -> None:
        """``observer``: told of every request once it is over (``gateway.metrics``), with the
        ``Exchange`` this endpoint filled in as it served it."""
        self.serving = serving
        self.endpoint = endpoint
        self.observer = observer

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # a plain method handing back the coroutine that serves: no frame of its own unobserved
        if self.observer is None:
            return self._serve(scope, receive, send, None)
        return self._observed(scope, receive, send, self.observer)

    async def _observed(self, scope: Scope, receive: Receive, send: Send, observer: Observer) -> None:
        # The exchange is filled in here, where the reply is made, rather than by a wrapper
        # watching each ASGI message: no closure, no call per message, no header scan.
        ex = Exchange(perf_counter())
        token = CURRENT.set(ex)
        try:
            await self._serve(scope, receive, send, ex)
        except BaseException:
            if ex.status is None:
                ex.status = 500
            raise
        finally:
            CURRENT.reset(token)
            try:
                observer(ex, scope)
            except Exception:  # a metrics bug must never fail a request
                log.exception("metrics: observing request %s failed", scope.get(REQUEST_ID_KEY))
            # Tasks started during the request copied the context that holds ``ex`` and die in
            # reference cycles: emptied now, ``ex`` keeps no reply or usage alive until the cycle
            # collector runs (which then runs less often).
            ex.__dict__.clear()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, ex: Exchange | None) -> None:
        request_id: str = scope[REQUEST_ID_KEY]
        try:
            raw = await _read_body(receive)
            request = ClientRequest(
                endpoint=self.endpoint,
                body=parse_body(self.endpoint, raw),
                size=len(raw),
                request_id=request_id,
                key=scope.get(CLIENT_KEY),
            )
            scope[CLIENT_REQUEST_KEY] = request
            for name, value in scope["headers"]:
                if name == b"x-interlock-max-ttft-ms":
                    request.max_ttft_ms = value.decode("latin-1")
                elif name == b"x-interlock-session":
                    request.session = value.decode("latin-1")
                elif name == b"cache-control":
                    request.cache_control = value.decode("latin-1")
            edge = scope.get(EDGE_KEY)
            try:
                if edge is not None:
                    reply = await _unless_connection_lost(self.serving.serve(request), edge)
                else:
                    reply = await _unless_client_leaves(self.serving.serve(request), receive)
            finally:
                if request.rate_headers:  # x-ratelimit-*: on every response, refusals and streams too
                    send = _with_headers(send, request.rate_headers)
        except ClientGone:
            return
        except InterlockError as exc:
            if ex is not None:
                ex.status, ex.last, ex.done = client_status(exc), error_body(exc), True
            await send_error(send, exc)
            return
        if isinstance(reply, Replayed):
            if ex is not None:
                ex.backend, ex.cache = CACHE_BACKEND, reply.cache
            await _replay(reply, scope, receive, send, ex)
            return
        if isinstance(reply, Opened):
            headers = {**_SSE_HEADERS, **route_headers(reply.target, reply.reason)}
            if reply.cache is not None:
                headers["x-interlock-cache"] = reply.cache
            if ex is not None:
                ex.backend, ex.reason, ex.cache = reply.target.name, reply.reason, reply.cache
            events = relay(reply.first, until_shutdown(reply.rest), request_id, ex)
            await _write_stream(events, headers, scope, receive, send, ex)
            return
        target, usage, body = reply.target, reply.reply.usage, reply.reply.body
        out = [
            _JSON,
            (b"content-length", b"%d" % len(body)),
            (b"x-interlock-backend", target.name.encode()),
            (b"x-interlock-route-reason", _header_safe(reply.reason).encode()),
        ]
        if usage is not None:
            out.append((b"x-interlock-cost-usd", b"%.8f" % target.cost_usd(usage)))
        if reply.cache is not None:
            out.append((b"x-interlock-cache", reply.cache.encode()))
        if ex is not None:
            ex.status, ex.backend, ex.reason, ex.cache = 200, target.name, reply.reason, reply.cache
            ex.last = body
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": body})
        if ex is not None:
            ex.done = True


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    # a plain function handing back send's awaitable: no coroutine per message of a stream
    def sending(message: Any) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *extra]
        return send(message)

    return sending


async def _replay(reply: Replayed, scope: Scope, receive: Receive, send: Send, ex: Exchange | None) -> None:
    """An answer from the response cache: no backend, no cost, its age."""
    headers = {
        "x-interlock-cache": reply.cache,
        "age": str(int(reply.age_s)),
        "x-interlock-backend": "cache",
        "x-interlock-cost-usd": "0.00000000",
    }
    if reply.body is not None:
        out = [_JSON, (b"content-length", b"%d" % len(reply.body))]
        out += ((k.encode(), v.encode()) for k, v in headers.items())
        if ex is not None:
            ex.status, ex.last = 200, reply.body
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": reply.body})
        if ex is not None:
            ex.done = True
        return
    assert reply.events is not None
    await _write_stream(_events(reply.events, ex), {**_SSE_HEADERS, **headers}, scope, receive, send, ex)


async def _write_stream(
    events: AsyncIterator[bytes],
    headers: dict[str, str],
    scope: Scope,
    receive: Receive,
    send: Send,
    ex: Exchange | None,
) -> None:
    """SSE out as the events come. On the gateway's own server the connection cancels the writing
    when the client leaves; elsewhere Starlette's ``StreamingResponse`` listens for it, with a task
    group and a listener task per stream, which cost more than a short stream's relaying."""
    edge: EdgeProtocol | None = scope.get(EDGE_KEY)
    if ex is not None:
        ex.status = 200  # the head goes out first: a client that leaves later left a 200
    if edge is None:
        await StreamingResponse(events, media_type=_SSE_TYPE, headers=headers)(scope, receive, send)
        return
    out = [(b"content-type", _SSE_CONTENT_TYPE), *((k.encode(), v.encode()) for k, v in headers.items())]
    task = asyncio.current_task()
    assert task is not None
    try:
        await send({"type": "http.response.start", "status": 200, "headers": out})
        edge.watch(task)
        async for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        edge.watch(None)
        await send({"type": "http.response.body", "body": b""})
    except asyncio.CancelledError:
        if not edge.client_left:
            raise
        task.uncancel()  # the client left: nobody to tell
    finally:
        edge.watch(None)
        await events.aclose()  # type: ignore[attr-defined]


async def _events(events: list[bytes], ex: Exchange | None) -> AsyncIterator[bytes]:
    for event in events:
        if ex is not None:
            ex.note(event)
        yield event
    if ex is not None:
        ex.done = True


#: a request answered sooner than this is not watched for its client leaving: a watcher task per
#: request costs more than the whole of a fast request's wait, and a reply so quick is cheap anyway
WATCH_AFTER_S = 0.02


async def _unless_client_leaves(work: Awaitable[T], receive: Receive) -> T:
    """``work``, cancelled (upstream call included, no retry started) if the client disconnects
    before it is done; raises ``ClientGone`` then. The body has been read: the next message
    the server has for us is the disconnect."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone from None
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _unless_connection_lost(work: Awaitable[T], edge: EdgeProtocol) -> T:
    """``_unless_client_leaves`` on the gateway's own server: the connection's protocol cancels
    the request when it is lost, with no timer and no watcher task."""
    task = asyncio.current_task()
    edge.watch(task)
    try:
        return await work
    except asyncio.CancelledError:
        if not edge.client_left:
            raise
        assert task is not None
        task.uncancel()
        raise ClientGone from None
    finally:
        edge.watch(None)


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body  # the usual case: one message
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


def route_headers(target: Target, reason: str) -> dict[str, str]:
    return {"x-interlock-backend": target.name, "x-interlock-route-reason": _header_safe(reason)}


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")[:300]


async def relay(
    first: bytes, rest: AsyncIterator[bytes], request_id: str, ex: Exchange | None = None
) -> AsyncIterator[bytes]:
    """Pass SSE bytes through untouched; a failure after the first byte becomes an error event,
    never a quiet end that a client would take for a finished answer. ``ex`` (metrics on) notes
    the time of the first byte, the last chunks and whether the stream was relayed to its end."""
    tail = first
    if ex is None:
        note = None
    else:
        ex.first_byte = perf_counter()
        note = ex.note
        note(first)
    try:
        yield first
        async for chunk in rest:
            tail = chunk
            if note is not None:
                note(chunk)
            yield chunk
    except InterlockError as exc:
        log.warning("stream %s broke after its first byte: %s", request_id, exc.message)
        event = (b"" if tail.endswith(b"\n\n") else b"\n\n") + sse_error_event(exc)
        if note is not None:
            note(event)
        yield event
    except Exception:
        log.exception("stream %s failed", request_id)
        event = (b"" if tail.endswith(b"\n\n") else b"\n\n") + sse_error_event(
            InterlockError(f"The gateway hit an internal error; quote request id {request_id}.")
        )
        if note is not None:
            note(event)
        yield event
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    if ex is not None:
        ex.done = True  # reached only when the consumer asked past the last event


class HotPaths:
    """Sends ``(method, path)`` pairs in ``table`` straight to their ASGI app, the rest to ``app``.

    The inference endpoints live here; everything else (models, health, admin, 404/405
    answers) stays with Starlette, where convenience matters more than microseconds.
    """

    def __init__(self, table: dict[tuple[str, str], Any], app: Any) -> None:
        self.table = table
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.table.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.app(scope, receive, send)
