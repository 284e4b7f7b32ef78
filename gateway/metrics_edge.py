"""The edge side of metrics: what one request did, as its endpoint and its attempts saw it.

An inference endpoint (``gateway.inference``) fills in an ``Exchange`` as it serves a request
(status, who answered and why, the first byte, the last chunks, the end), puts it in a context
variable (``CURRENT``) for the attempt listener to find (hedge tasks inherit it), and hands it to
its ``Observer`` when the request is over, however it ended.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from backends.base import Usage
from backends.errors import BackendOverloaded, BackendTimeout, BackendUnavailable, UpstreamHTTPError
from gateway.snapshot import Target


class Exchange:
    """One request as the edge and the router saw it. Class-level defaults rather than slots:
    a request sets only what happened to it (an ``__init__`` of twenty fields costs ~1 us)."""

    status: int | None = None
    #: the backend that answered (``cache`` for a replay), why it was chosen, what the cache did
    backend: str | None = None
    reason: str | None = None
    cache: str | None = None
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

    def note(self, chunk: bytes) -> None:
        """A stream's chunk went out: the last three are kept for the access log's tail."""
        self.p2, self.prev, self.last = self.prev, self.last, chunk


#: told of a request once it is over (``gateway.metrics.Metrics.finish``)
Observer = Callable[[Exchange, Scope], None]
#: the ``backend`` of an answer replayed by the response cache
CACHE_BACKEND = "cache"


CURRENT: ContextVar[Exchange | None] = ContextVar("interlock_exchange", default=None)


class AsAdmin:
    """An ASGI app (an object, so Starlette's ``Route`` does not take it for a request handler)
    that ``ClientAuth`` judges as it judges ``/admin/``: one rule, not a copy of it."""

    def __init__(self, guarded: ASGIApp) -> None:
        self._guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._guarded({**scope, "path": "/admin/metrics"}, receive, send)


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
