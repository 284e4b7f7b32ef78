"""The edge side of metrics: what one request did, as its ASGI messages and its attempts show.

``Observed`` wraps an inference endpoint: it watches the messages the endpoint sends (status and
headers, the first body byte, the last chunks, the end) into an ``Exchange``, which it also puts
in a context variable (``CURRENT``) for the attempt listener to find (hedge tasks inherit it),
and hands the ``Exchange`` over when the request is over, however it ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.base import Usage
from backends.errors import BackendOverloaded, BackendTimeout, BackendUnavailable, UpstreamHTTPError
from gateway.middleware import REQUEST_ID_KEY
from gateway.snapshot import Target

log = logging.getLogger("interlock.metrics")


class Exchange:
    """One request as the edge and the router saw it. Class-level defaults rather than slots:
    a request sets only what happened to it (an ``__init__`` of twenty fields costs ~1 us)."""

    status: int | None = None
    headers: Any = ()
    first_byte: float | None = None
    done = False
    p2 = prev = last = b""
    attempts = running = hedges = 0
    #: why each call after the first was made (the previous one's end, bounded names)
    retries: tuple[str, ...] = ()
    #: "backend: why" per failed call, for the access log
    failures: tuple[str, ...] = ()
    upstream_s = 0.0
    usage: Usage | None = None
    target: Target | None = None
    last_target: Target | None = None
    error: BaseException | None = None
    broke = False

    def __init__(self, started: float) -> None:
        self.started = started


CURRENT: ContextVar[Exchange | None] = ContextVar("interlock_exchange", default=None)


class AsAdmin:
    """An ASGI app (an object, so Starlette's ``Route`` does not take it for a request handler)
    that ``ClientAuth`` judges as it judges ``/admin/``: one rule, not a copy of it."""

    def __init__(self, guarded: ASGIApp) -> None:
        self._guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._guarded({**scope, "path": "/admin/metrics"}, receive, send)


class Observed:
    """An inference endpoint whose every request is measured when it is over."""

    __slots__ = ("_app", "_finish")

    def __init__(self, app: ASGIApp, finish: Callable[[Exchange, Scope], None]) -> None:
        self._app = app
        #: settles the request's figures once it is over (``Metrics._finish``)
        self._finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        clock = time.perf_counter
        ex = Exchange(clock())
        token = CURRENT.set(ex)

        # A plain function handing back send's awaitable: no coroutine of its own per message,
        # which a stream of many chunks would pay for each one.
        def observing(message: Message) -> Awaitable[None]:
            if message.get("more_body"):  # a stream's chunk: the common case first
                if ex.first_byte is None:
                    ex.first_byte = clock()
                ex.p2, ex.prev, ex.last = ex.prev, ex.last, message["body"]
            elif message["type"] == "http.response.body":
                ex.done = True
                body = message.get("body")
                if body:
                    ex.p2, ex.prev, ex.last = ex.prev, ex.last, body
            else:
                ex.status = message["status"]
                ex.headers = message.get("headers", ())
            return send(message)

        try:
            await self._app(scope, receive, observing)
        except BaseException:
            if ex.status is None:
                ex.status = 500
            raise
        finally:
            CURRENT.reset(token)
            try:
                self._finish(ex, scope)
            except Exception:  # a metrics bug must never fail a request
                log.exception("metrics: observing request %s failed", scope.get(REQUEST_ID_KEY))
            # Tasks started during the request (the edge's disconnect watcher) copied the context
            # that holds ``ex``, and die in reference cycles: emptied now, ``ex`` keeps no reply,
            # headers or usage alive until the cycle collector runs (which then runs less often).
            ex.__dict__.clear()


def ended_by(exc: BaseException | None) -> str:
    """A bounded name for how a call ended (retry reasons; the access log's failures)."""
    if isinstance(exc, BackendTimeout):
        return "timeout"
    if isinstance(exc, BackendOverloaded):
        return "busy"
    if isinstance(exc, UpstreamHTTPError):
        return "upstream_4xx" if exc.status < 500 else "upstream_5xx"
    if isinstance(exc, BackendUnavailable):
        return "unavailable"
    return "other"
