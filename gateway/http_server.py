"""uvicorn's httptools protocol with a cap on the request head.

httptools puts no limit on the request line and headers: it buffers an unfinished header for as
long as bytes keep coming (1,000 connections each sending an endless header took over 1 GB).
``HeadCappedProtocol`` counts the bytes of each request's head as they arrive and, past
``max_head_bytes``, answers 431 with an OpenAI error body and closes the connection, before the
head ends. Bodies are not counted here (``gateway.middleware.BodyLimit`` caps those).

After the 431 the connection is half-closed and what the client still sends is read and dropped
for a moment before the socket closes: closing with unread bytes would send a reset, and the
client would likely lose the 431 with it.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import HeadersTooLarge, error_body

DEFAULT_MAX_HEAD_BYTES = 64 * 1024
#: what a head holds beyond the URL and the header names and values: "METHOD ", " HTTP/1.1\r\n",
#: the blank line, and ": " plus "\r\n" per header
_REQUEST_LINE_EXTRA = 24
_PER_HEADER_EXTRA = 4
#: how long a refused connection's further bytes are read and dropped before it closes
_LINGER_S = 2.0


class HeadCappedProtocol(HttpToolsProtocol):
    """Counts head bytes chunk by chunk: a chunk that neither started in a body nor ended the head
    is head through and through; the chunk that ends a head is checked on what it parsed to."""

    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_body = False
        self._head_ended = False
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        counting = not self._in_body
        self._head_ended = False
        super().data_received(data)
        if counting and not self._head_ended and not self._in_body and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._head_ended = True
        size = (_REQUEST_LINE_EXTRA + len(self.url)
                + sum(len(name) + len(value) + _PER_HEADER_EXTRA for name, value in self.headers))
        if max(size, self._head_bytes) > self.max_head_bytes:
            self._refuse()
            return
        self._head_bytes = 0
        self._in_body = True
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        super().on_message_complete()

    def _refuse(self) -> None:
        self._refused = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            # not while an earlier response is still going out on this connection: only close
            body = error_body(HeadersTooLarge(
                f"The request line and headers are over {self.max_head_bytes} bytes."))
            self.transport.write(b"".join((
                STATUS_LINE[431], b"content-type: application/json\r\n",
                b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body,
            )))
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(_LINGER_S, self.transport.close)
                return
        self.transport.close()


def head_capped_protocol(max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> type[HeadCappedProtocol]:
    """A ``HeadCappedProtocol`` class with its cap: uvicorn takes a class, not an instance."""
    return type("HeadCappedProtocol", (HeadCappedProtocol,), {"max_head_bytes": max_head_bytes})
