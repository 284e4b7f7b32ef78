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
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.base import Endpoint
from backends.errors import InterlockError
from gateway.cache_step import Replayed
from gateway.errors import sse_error_event
from gateway.http_server import EDGE_KEY, EdgeProtocol
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

    def __init__(self, serving: Serving, endpoint: Endpoint) -> None:
        self.serving = serving
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            await send_error(send, exc)
            return
        if isinstance(reply, Replayed):
            await _replay(reply, scope, receive, send)
            return
        if isinstance(reply, Opened):
            headers = {**_SSE_HEADERS, **route_headers(reply.target, reply.reason)}
            if reply.cache is not None:
                headers["x-interlock-cache"] = reply.cache
            events = relay(reply.first, until_shutdown(reply.rest), request_id)
            await _write_stream(events, headers, scope, receive, send)
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
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": body})


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    # a plain function handing back send's awaitable: no coroutine per message of a stream
    def sending(message: Any) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *extra]
        return send(message)

    return sending


async def _replay(reply: Replayed, scope: Scope, receive: Receive, send: Send) -> None:
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
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": reply.body})
        return
    assert reply.events is not None
    await _write_stream(_events(reply.events), {**_SSE_HEADERS, **headers}, scope, receive, send)


async def _write_stream(
    events: AsyncIterator[bytes], headers: dict[str, str], scope: Scope, receive: Receive, send: Send
) -> None:
    """SSE out as the events come. On the gateway's own server the connection cancels the writing
    when the client leaves; elsewhere Starlette's ``StreamingResponse`` listens for it, with a task
    group and a listener task per stream, which cost more than a short stream's relaying."""
    edge: EdgeProtocol | None = scope.get(EDGE_KEY)
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


async def _events(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


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


async def relay(first: bytes, rest: AsyncIterator[bytes], request_id: str) -> AsyncIterator[bytes]:
    """Pass SSE bytes through untouched; a failure after the first byte becomes an error event,
    never a quiet end that a client would take for a finished answer."""
    tail = first
    try:
        yield first
        async for chunk in rest:
            tail = chunk
            yield chunk
    except InterlockError as exc:
        log.warning("stream %s broke after its first byte: %s", request_id, exc.message)
        yield (b"" if tail.endswith(b"\n\n") else b"\n\n") + sse_error_event(exc)
    except Exception:
        log.exception("stream %s failed", request_id)
        yield (b"" if tail.endswith(b"\n\n") else b"\n\n") + sse_error_event(
            InterlockError(f"The gateway hit an internal error; quote request id {request_id}.")
        )
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


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
