"""uvicorn's httptools protocol with the edge's limits: the size of a request head, deadlines for
slow clients, and a bound on open connections.

Head size: httptools puts no limit on the request line and headers: it buffers an unfinished
header for as long as bytes keep coming (1,000 connections each sending an endless header took
over 1 GB). The bytes of each request's head are counted as they arrive and, past
``max_head_bytes``, the client gets 431, before the head ends. Bodies are not counted here
(``gateway.middleware.BodyLimit`` caps those).

Deadlines: uvicorn's only timer is the keep-alive one, armed once a response ends, so a
connection that sends nothing, or trickles its head or body, is held forever. Here the head must
be complete ``header_timeout_s`` after the connection opened or the previous response ended, and a
body must keep coming: no gap of ``body_timeout_s``, and on average ``body_min_bytes_per_s`` once
a first ``body_timeout_s`` is over (as Apache's ``RequestReadTimeout body=10,MinRate=500``,
https://httpd.apache.org/docs/2.4/mod/mod_reqtimeout.html). A connection past its deadline gets
408 where no response is under way (an idle keep-alive connection is closed quietly, as uvicorn's
keep-alive timeout does), and is closed in any case. While the server itself is not reading
(flow control, a 100 Continue not sent yet) the body's clock does not run against the client.

Connections: past ``max_connections`` open at once, a new connection gets 503 with an OpenAI error
body as soon as it is accepted. uvicorn's ``limit_concurrency`` does not fit: it answers only once
a request head is complete (a slow head never is), in text/plain.

A refused connection is half-closed and what the client still sends is read and dropped for a
moment before the socket closes: closing with unread bytes would send a reset, and the client
would likely lose the answer with it.
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from gateway.errors import HeadersTooLarge, InterlockError, error_body, error_headers

DEFAULT_MAX_HEAD_BYTES = 64 * 1024
#: the scope key under which a request finds the connection's ``EdgeProtocol``
EDGE_KEY = "interlock.edge"
#: what a head holds beyond the URL and the header names and values: "METHOD ", " HTTP/1.1\r\n",
#: the blank line, and ": " plus "\r\n" per header
_REQUEST_LINE_EXTRA = 24
_PER_HEADER_EXTRA = 4
#: how long a refused connection's further bytes are read and dropped before it closes
_LINGER_S = 2.0
#: what a connection is waiting for: nothing with a deadline (a request being served), a head, a body
_SERVING, _HEAD, _BODY = 0, 1, 2


class RequestTimeout(InterlockError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class TooManyConnections(InterlockError):
    status = 503
    type = "server_error"
    code = "too_many_connections"


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    #: 0: only the gap between body bytes is bounded
    body_min_bytes_per_s: float = 500.0
    max_connections: int = 10_000


class EdgeProtocol(HttpToolsProtocol):
    """Counts head bytes chunk by chunk: a chunk that neither started in a body nor ended the head
    is head through and through; the chunk that ends a head is checked on what it parsed to.

    One timer per connection for both deadlines, moved only when it fires early (as
    ``backends.http_timeouts.IdleWatch``): arming and cancelling one per request would cost more
    than the rest of this class's work on it.
    """

    limits: EdgeLimits = EdgeLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_body = False
        self._head_ended = False
        self._refused = False
        self._phase = _SERVING
        #: when the head's wait began, or the body's
        self._since = 0.0
        self._body_last = 0.0
        self._body_bytes = 0
        #: a byte of the next request's head has arrived
        self._head_begun = False
        self._served = 0
        self._timer: TimerHandle | None = None
        #: bytes of the data_received call being parsed
        self._chunk = 0
        #: a request whose app waits for its body to come in
        self._deferred: tuple[RequestResponseCycle, ASGI3Application] | None = None
        #: the task serving a request that wants to be cancelled if the client leaves (``watch``)
        self._watching: asyncio.Task[Any] | None = None
        self.client_left = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        limit = self.limits.max_connections
        if len(self.connections) > limit:
            self.connections.discard(self)  # a refused connection holds no place
            self._refuse(
                TooManyConnections(
                    f"The gateway has {limit} connections open, its limit; retry shortly.", retry_after=1
                )
            )
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._deferred = None
        super().connection_lost(exc)
        self.client_left = True
        task, self._watching = self._watching, None
        if task is not None:
            task.cancel()

    def watch(self, task: asyncio.Task[Any] | None) -> None:
        """Cancel ``task`` if the connection is lost (at once if it is already), until
        ``watch(None)``: what an app would otherwise learn by waiting on ``receive()`` for
        ``http.disconnect`` in a task of its own."""
        self._watching = task
        if task is not None and self.client_left:
            self._watching = None
            task.cancel()

    def on_message_begin(self) -> None:
        self._head_begun = True
        super().on_message_begin()
        self.scope[EDGE_KEY] = self  # type: ignore[literal-required]

    def shutdown(self) -> None:
        if self._deferred is not None:  # a request whose body never came: nothing to finish
            self._deferred = None
            self.transport.close()
            return
        super().shutdown()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # The app starts once the body is in (or a buffer's worth, or the client waits for a 100
        # Continue): a slow body then holds a parser and a buffer, not a task with its frames,
        # whose numbers (5,000 slow bodies) made each full pass of the collector stall the loop
        if cycle.more_body and not cycle.waiting_for_100_continue and len(cycle.body) <= HIGH_WATER_LIMIT:
            self._deferred = (cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def _start_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            super()._start_asgi_task(*deferred)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        counting = not self._in_body
        self._head_ended = False
        self._chunk = len(data)
        super().data_received(data)
        if counting and not self._head_ended and not self._in_body and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse_head()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._head_ended = True
        # the head is within what has arrived: only when that passes the cap is it measured
        if self._head_bytes + self._chunk > self.limits.max_head_bytes:
            size = (
                _REQUEST_LINE_EXTRA
                + len(self.url)
                + sum(len(name) + len(value) + _PER_HEADER_EXTRA for name, value in self.headers)
            )
            if max(size, self._head_bytes) > self.limits.max_head_bytes:
                self._refuse_head()
                return
        self._head_bytes = 0
        self._in_body = True
        self._head_begun = False
        now = self.loop.time()
        self._phase, self._since, self._body_last, self._body_bytes = _BODY, now, now, 0
        self._arm(now + self.limits.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        self._body_last = self.loop.time()
        cycle = self.cycle
        if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.body += body
        # uvicorn's on_body, except that the app is woken when the body is complete or a buffer's
        # worth is in, not per chunk: a body trickled a byte at a time cost a task switch a byte
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self._start_deferred()
            self.flow.pause_reading()
            cycle.message_event.set()

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        self._phase = _SERVING
        super().on_message_complete()
        self._start_deferred()
        if self.cycle is not None and self.cycle.response_complete:
            self._await_head()  # answered before its body was in: the next head's wait starts now

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)  # a pipelined request whose head is already in
        super().on_response_complete()
        self._served += 1
        if not queued and not self._in_body and not self.transport.is_closing():
            self._await_head()

    # -- deadlines ------------------------------------------------------------------------------

    def _await_head(self) -> None:
        self._phase = _HEAD
        self._since = now = self.loop.time()
        self._arm(now + self.limits.header_timeout_s)

    def _arm(self, due: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= due:
                return  # it fires first and moves itself on
            timer.cancel()
        self._timer = self.loop.call_at(due, self._check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._refused or self._phase == _SERVING or self.transport.is_closing():
            return
        now = self.loop.time()
        due = self._due(now)
        if now < due:
            self._timer = self.loop.call_at(due, self._check)
        elif self._phase == _HEAD:
            if self._served and not self._head_begun:
                self.transport.close()  # an idle keep-alive connection
            else:
                self._refuse(
                    RequestTimeout(
                        f"The request head did not arrive within {self.limits.header_timeout_s:g} s."
                    )
                )
        else:
            self._refuse(
                RequestTimeout(
                    f"The request body stalled: no bytes for {self.limits.body_timeout_s:g} s, or "
                    f"under {self.limits.body_min_bytes_per_s:g} bytes/s."
                ),
                answer=self.cycle is not None and not self.cycle.response_started and not self.pipeline,
            )

    def _due(self, now: float) -> float:
        limits = self.limits
        if self._phase == _HEAD:
            return self._since + limits.header_timeout_s
        rate = limits.body_min_bytes_per_s
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # the server is not reading: the clock starts afresh once it does
            self._body_last = now
            self._since = now - (self._body_bytes / rate if rate else 0.0)
        due = self._body_last + limits.body_timeout_s
        if rate:
            due = min(due, self._since + limits.body_timeout_s + self._body_bytes / rate)
        return due

    # -- refusals -------------------------------------------------------------------------------

    def _refuse_head(self) -> None:
        cycle = self.cycle
        # not while an earlier response is still going out on this connection: only close
        self._refuse(
            HeadersTooLarge(f"The request line and headers are over {self.limits.max_head_bytes} bytes."),
            answer=cycle is None or cycle.response_complete,
        )

    def _refuse(self, exc: InterlockError, *, answer: bool = True) -> None:
        self._refused = True
        self._deferred = None  # its app never started: it never will
        self._phase = _SERVING
        self._cancel_timer()
        if not answer:
            self.transport.close()
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # the app's own reply, should it come, is dropped; it sees the client gone
            cycle.disconnected = True
            cycle.message_event.set()
        body = error_body(exc)
        head = [STATUS_LINE[exc.status]]
        for name, value in error_headers(exc).items():
            head += (name.encode(), b": ", value.encode(), b"\r\n")
        self.transport.write(
            b"".join(
                (
                    *head,
                    b"content-length: ",
                    str(len(body)).encode(),
                    b"\r\nconnection: close\r\n\r\n",
                    body,
                )
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)
            return
        self.transport.close()


def edge_protocol(limits: EdgeLimits) -> type[EdgeProtocol]:
    """An ``EdgeProtocol`` class with its limits: uvicorn takes a class, not an instance."""
    return type("EdgeProtocol", (EdgeProtocol,), {"limits": limits})
