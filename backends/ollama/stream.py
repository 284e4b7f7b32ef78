"""An Ollama NDJSON stream relayed as OpenAI SSE, line by line as it arrives.

Ollama streams one JSON object a line (§1, §6 of the API reference), the last with
``done: true``; ``Shape`` (``backends.ollama.reply``) turns each into SSE bytes. Lines may
be up to 16 MiB. An ``{"error": ...}`` line raises ``BackendError`` (the backend's ``parse``);
a stream that ends without ``done: true`` raises ``BackendUnavailable``. Closing the relay
closes the connection, which is how Ollama learns the client left (it then stops generating).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp

from backends.errors import BackendTimeout, BackendUnavailable, InterlockError
from backends.http_timeouts import IdleWatch
from backends.ollama.reply import Shape

MAX_LINE = 16 * 1024 * 1024


class NdjsonRelay:
    """The backend's stream() iterator: reads NDJSON lines and yields OpenAI SSE bytes.

    A class rather than an async generator so that ``aclose()`` frees the connection even when
    nobody iterated it yet. ``parse`` reads a line (raising on an error line), ``unavailable``
    names a transport failure, ``on_done`` gets the last line's figures and ``on_end`` runs once
    when the response is given up, cleanly or not. ``idle`` bounds the wait for bytes once
    ``prime()`` is done (the caller bounds the wait for the first ones).
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        shape: Shape,
        *,
        idle: float | None = None,
        parse: Callable[[bytes], dict[str, Any]],
        unavailable: Callable[[aiohttp.ClientError], InterlockError],
        on_done: Callable[[dict[str, Any]], None],
        on_end: Callable[[], None],
    ) -> None:
        self._response: aiohttp.ClientResponse | None = response
        self._shape = shape
        self._parse = parse
        self._unavailable = unavailable
        self._on_done = on_done
        self._on_end = on_end
        self._idle = idle
        self._primed = False
        self._watch: IdleWatch | None = None
        self._buffer = bytearray()
        self._scanned = 0
        self._ready: deque[bytes] = deque()
        self._finished = False

    def __aiter__(self) -> NdjsonRelay:
        return self

    async def prime(self) -> None:
        """Read until there is something to send (or the reply is complete); errors raise here."""
        while not self._ready and not self._finished:
            await self._read_one()
        self._primed = True

    async def __anext__(self) -> bytes:
        while not self._ready:
            if self._finished:
                raise StopAsyncIteration
            await self._read_one()
        return self._ready.popleft()

    async def _read_one(self) -> None:
        if self._response is None:
            raise BackendUnavailable("the ollama stream was already closed")
        try:
            line = await self._next_line(self._response)
            if line is None:
                raise BackendUnavailable("ollama ended the stream before it finished (no done line)")
            data = self._parse(line)
            out, done = self._shape.feed(data)
        except TimeoutError:
            self._end(clean=False)
            raise BackendTimeout("the ollama stream went past its total time limit") from None
        except aiohttp.ClientError as exc:
            self._end(clean=False)
            raise self._unavailable(exc) from None
        except BaseException:
            self._end(clean=False)
            raise
        if out:
            self._ready.append(out)
        if done:
            self._finished = True
            self._on_done(data)
            self._end(clean=True)

    async def _next_line(self, response: aiohttp.ClientResponse) -> bytes | None:
        buffer = self._buffer
        while True:
            at = buffer.find(b"\n", self._scanned)
            if at >= 0:
                line = bytes(buffer[:at])
                del buffer[: at + 1]
                self._scanned = 0
                if line.strip():
                    return line
                continue
            self._scanned = len(buffer)
            if len(buffer) > MAX_LINE:
                raise BackendUnavailable("ollama sent a line longer than 16 MiB")
            data = await self._read_more(response)
            if not data:  # EOF: a last line without its newline still counts
                line = bytes(buffer)
                buffer.clear()
                self._scanned = 0
                return line if line.strip() else None
            buffer += data

    async def _read_more(self, response: aiohttp.ClientResponse) -> bytes:
        watch = self._watch
        if watch is None:
            if self._idle is None or not self._primed:
                return await response.content.readany()
            watch = self._watch = IdleWatch(self._idle)
        watch.start()
        try:
            return await response.content.readany()
        except asyncio.CancelledError:
            if watch.fired():
                raise BackendTimeout(f"no bytes from ollama for {watch.idle:g}s") from None
            raise
        finally:
            watch.stop()

    async def aclose(self) -> None:
        self._end(clean=False)

    def _end(self, *, clean: bool) -> None:
        if self._watch is not None:
            self._watch.close()
        response, self._response = self._response, None
        if response is None:
            return
        self._on_end()
        # release() keeps a fully read connection for reuse; close() drops it, which is what tells a
        # still-generating Ollama that nobody is listening any more
        if clean:
            response.release()
        else:
            response.close()

    def __del__(self) -> None:
        if self._response is not None:
            self._response.close()


__all__ = ["MAX_LINE", "NdjsonRelay"]
